"""Record schemas shared by stages (the columns later stages rely on)."""
import pyarrow as pa

IMAGES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("url", pa.string()), ("path", pa.string()),
                    ("bytes", pa.binary())])
FILTERED_IMAGES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("url", pa.string()),
                             ("path", pa.string()), ("bytes", pa.binary()), ("width", pa.int32()),
                             ("height", pa.int32()), ("sha256", pa.string()),
                             # row in download/images-i.parquet (same i) holding the bytes: engine/image_source.py
                             ("src_row", pa.int64())])
SENTENCES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string())])
SCORED_SENTENCES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                              ("entropy", pa.float64())])
PPL_SENTENCES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                           ("entropy", pa.float64()), ("ppl", pa.float64())])
# attempts/seconds: builtin fetcher only; sizes: img2dataset's (after its resize); sha256 of the stored bytes
FETCH_STATUS = pa.schema([("id", pa.string()), ("url", pa.string()), ("status", pa.string()),
                          ("attempts", pa.int32()), ("seconds", pa.float64()), ("error_message", pa.string()),
                          ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                          ("original_height", pa.int32()), ("sha256", pa.string())])
WORD_COUNTS = pa.schema([("word", pa.string()), ("count", pa.int64())])
# stage 2's output, retrieve/retrieved-j.parquet (texts, sentence_ids, sims, clusters best first): what syn_text,
# balance and write read
RETRIEVED = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("url", pa.string()),
                       ("texts", pa.list_(pa.string())), ("sentence_ids", pa.list_(pa.string())),
                       ("sims", pa.list_(pa.float32())), ("clusters", pa.list_(pa.int64())),
                       ("probe_cluster", pa.int64()), ("probe_sim", pa.float32())])

"""Your own images and captions -> `shards` -> `fit` -> `eval` of the export by its path alone: a folder of jpg + txt
and a CSV of (relative path, caption) give the same samples; every skip is counted by reason; a wrong table or
folder is one line and exit 2."""
import io
import json
import shlex
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import eval_support as E
from conftest import TINY_CLIP, TINY_NAME
from realsyn_pl.cli import main
from realsyn_pl.config import ConfigError, load_config, to_object
from realsyn_pl.construct.extract import img2dataset_run
from realsyn_pl.evaluation import synthetic
from realsyn_pl.evaluation.config import EvalConfig
from realsyn_pl.training import callbacks  # noqa: F401 - Lightning first imported here, not under a test's capsys

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
N = 12  # good images; plus a corrupt one, one without caption, one caption without image


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A folder as a user has it (a.jpg + a.txt, a subfolder, mistakes) and a CSV of the same pairs."""
    root = tmp_path_factory.mktemp("own")
    photos = root / "photos"
    (photos / "more").mkdir(parents=True)
    rows = [("photos/broken.jpg", "a broken file")]
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (photos / "broken.txt").write_text("a broken file\n")
    for i in range(N):
        name, rgb = list(COLOURS.items())[i % len(COLOURS)]
        sub = "more/" if i >= N // 2 else ""
        Image.new("RGB", (32, 32), rgb).save(photos / f"{sub}img{i:02d}.jpg", quality=95)
        (photos / f"{sub}img{i:02d}.txt").write_text(f"a photo of a {name} square.\n")
        rows.append((f"photos/{sub}img{i:02d}.jpg", f"a photo of a {name} square."))
    Image.new("RGB", (32, 32)).save(photos / "uncaptioned.png")
    (photos / "orphan.txt").write_text("a caption whose image is gone")
    # the CSV: the same pairs in the same order, a row whose file is missing and one without caption
    table = root / "captions.csv"
    lines = ["path,caption,alt"] + [f"{p},{c},alt {k}" for k, (p, c) in enumerate(rows)]
    lines[4:4] = ["photos/missing.jpg,gone,x", "photos/img00.jpg,,x"]
    table.write_text("\n".join(lines) + "\n")
    return photos, table


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def summary_lines(out: str) -> dict[str, str]:
    """The end-of-run lines by what they start with."""
    lines = [ln for ln in out.splitlines() if ln.startswith(("shards: wrote", "shards: skipped", "next:"))]
    return {ln.split(":")[1].split()[0] if ln.startswith("shards") else "next": ln for ln in lines}


def test_folder_to_shards_to_fit_to_eval_of_the_export_by_path(own, tmp_path, capsys):
    photos, _ = own
    out = tmp_path / "shards"
    assert main(["shards", f"input={photos}", f"output_dir={out}", "fetcher=builtin", "samples_per_shard=8"]) == 0
    said = summary_lines(capsys.readouterr().out)
    # rows in path order: broken.jpg, img00..05, then more/img06..11; tar 0 = rows 0..7, tar 1 = rows 8..12
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 7, "00001.tar": 5}
    assert said["wrote"].startswith(f"shards: wrote {N} samples in 2 tar(s) to {out} (fetcher: builtin")
    assert said["skipped"] == (f"shards: skipped 3: decode_error 1 (first: {photos / 'broken.jpg'}); "
                               f"no_caption 1 (first: {photos / 'uncaptioned.png'}); "
                               f"no_image 1 (first: {photos / 'orphan.txt'})")
    first = members(out / "00000.tar")
    assert sorted(first)[:3] == ["000001.jpg", "000001.json", "000001.txt"]  # img2dataset's keys; row 0 was broken
    assert first["000001.txt"] == b"a photo of a red square."
    meta = json.loads(first["000001.json"])
    assert meta["caption"] == "a photo of a red square." and meta["status"] == "success"
    assert meta["url"] == (photos / "img00.jpg").as_uri() and (meta["width"], meta["height"]) == (32, 32)
    assert first["000001.jpg"] == (photos / "img00.jpg").read_bytes()  # a JPEG that needs no resize keeps its bytes

    # the printed fit command, as printed, plus what makes it a tiny CPU run
    command = shlex.split(said["next"][len("next: "):])
    assert command[:4] == ["python", "-m", "realsyn_pl", "fit"]
    assert command[4] == f"data.train=[{{urls: '{out}/{{00000..00001}}.tar'}}]"
    run = tmp_path / "run"
    tiny = [f"output_dir={run}", f"model.name={TINY_NAME}", f"model.custom={json.dumps(TINY_CLIP)}",
            "data.workers=0", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_epochs=1",
            "logging.wandb=disabled", "logging.progress_bar=false", "data.shuffle_buffer=8",
            "optim.scheduler=constant"]
    assert main(["fit", *command[4:], *tiny]) == 0
    export = run / "export"
    assert json.loads((export / f"{TINY_NAME}.json").read_text()) == TINY_CLIP
    capsys.readouterr()

    # eval by the export's path alone: no model.name, no model.custom
    data = synthetic.write_classification(tmp_path / "colours", {"test": 12}, seed=3, px=32, labeling="colour")
    res = tmp_path / "eval"
    assert main(["eval", f"model.pretrained={export / 'open_clip_model.pt'}", f"output_dir={res}",
                 f"datasets=[{E.classification_entry(data)}]", "workers=0", "batch_size=16", "amp=false",
                 "trainer.accelerator=cpu", "linear_probe.cache_dir=null"]) == 0
    result = E.result_file(res, "colours", "zeroshot_classification")
    assert result["model"] == TINY_NAME and 0.0 <= result["metrics"]["acc1"] <= 1.0


def test_a_csv_of_relative_paths_gives_the_folder_samples(own, tmp_path, capsys):
    """Through img2dataset when installed (the default fetcher), else the builtin one: the same keys, images,
    captions and metadata as the folder's shards; the CSV's own mistakes are counted."""
    photos, table = own
    by_folder, by_table = tmp_path / "folder", tmp_path / "table"
    assert main(["shards", f"input={photos}", f"output_dir={by_folder}", "fetcher=builtin",
                 "samples_per_shard=8"]) == 0
    capsys.readouterr()
    assert main(["shards", f"input={table}", f"output_dir={by_table}", "samples_per_shard=8",
                 "extra_cols=[alt]"]) == 0
    said = summary_lines(capsys.readouterr().out)
    fetcher = "img2dataset" if img2dataset_run.available() else "builtin"
    assert f"(fetcher: {fetcher};" in said["wrote"]
    assert said["skipped"] == ("shards: skipped 3: decode_error 1 (first: "
                               f"{photos / 'broken.jpg'}); missing_image 1 (first: photos/missing.jpg); "
                               "no_caption 1 (first: photos/img00.jpg)")
    assert said["next"].endswith("data.text_keys=[text1,alt]")
    assert (json.loads((by_table / "sizes.json").read_text()) == json.loads((by_folder / "sizes.json").read_text())
            == {"00000.tar": 7, "00001.tar": 5})
    for tar in ("00000.tar", "00001.tar"):
        a, b = members(by_folder / tar), members(by_table / tar)
        assert sorted(a) == sorted(b)
        for name in a:
            if name.endswith(".json"):
                ja, jb = json.loads(a[name]), json.loads(b[name])
                keep = ("caption", "url", "key", "width", "height", "sha256")
                assert {k: ja[k] for k in keep} == {k: jb[k] for k in keep}
                assert jb["alt"].startswith("alt ")
            else:
                assert a[name] == b[name], name


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_tables_and_folders_are_one_line_and_exit_2(own, tmp_path, capsys):
    photos, table = own
    out = tmp_path / "out"
    no_caption = tmp_path / "no_caption.csv"
    no_caption.write_text("path,alt\nphotos/img00.jpg,x\n")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    cases = [
        ([f"input={no_caption}"], f"error: input {no_caption} has no caption column (caption, text, txt, title): "
                                  "set caption_col=<column> (its columns: path, alt)"),
        ([f"input={table}", "caption_col=title"],
         f"error: caption_col='title' is not a column of {table} (its columns: path, caption, alt)"),
        ([f"input={table}", "extra_cols=[alt,colour]"],
         f"error: extra_cols: 'colour' not a column of {table} (its columns: path, caption, alt)"),
        ([f"input={tmp_path / 'nothing.csv'}"], f"error: input {tmp_path / 'nothing.csv'}: no such file or folder"),
        ([f"input={broken}"], f"error: input {broken}: cannot read it as parquet ("),
        ([f"input={photos}", "extra_cols=[alt]"], "error: extra_cols name table columns, but input"),
        ([f"input={tmp_path / 'notes.md'}"], None),
    ]
    (tmp_path / "notes.md").write_text("hello")
    for args, expected in cases:
        assert main(["shards", f"output_dir={out}", "fetcher=builtin", *args]) == 2, args
        line = _one_error_line(capsys)
        assert line.startswith(expected or f"error: input {tmp_path / 'notes.md'}: neither a folder nor a table")
        assert not out.exists()  # nothing written before the input is known to be usable

    # a folder already holding something: refused, and overwrite=true never deletes what is not a shard
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["shards", f"input={photos}", f"output_dir={out}", "fetcher=builtin"]) == 2
    assert "is not empty" in _one_error_line(capsys)
    assert main(["shards", f"input={photos}", f"output_dir={out}", "fetcher=builtin", "overwrite=true"]) == 2
    assert _one_error_line(capsys) == (f"error: output_dir {out} holds notes.txt, which is not a shard: "
                                       "overwrite=true replaces shards only; give a new folder")
    assert (out / "notes.txt").read_text() == "mine"


def test_every_image_outside_the_image_root_is_an_error_with_the_root_to_set(tmp_path, capsys):
    images, meta = tmp_path / "images", tmp_path / "meta"
    images.mkdir()
    meta.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    pq.write_table(pa.table({"image": [str(images / "a.jpg")], "text": ["a black square"]}), meta / "t.parquet")
    assert main(["shards", f"input={meta / 't.parquet'}", f"output_dir={tmp_path / 'out'}", "fetcher=builtin"]) == 2
    assert _one_error_line(capsys) == (
        f"error: input {meta / 't.parquet'} holds no image with a caption (skipped 1: outside_image_root 1 (first: "
        f"{images / 'a.jpg'}); to read the images outside the image root, set image_root={tmp_path})")
    assert main(["shards", f"input={meta / 't.parquet'}", f"output_dir={tmp_path / 'out'}", "fetcher=builtin",
                 f"image_root={tmp_path}"]) == 0
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 1}


def test_eval_model_auto_reads_the_architecture_beside_the_weights(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    weights = export / "open_clip_model.pt"
    weights.write_bytes(b"")

    def model(*overrides):
        return to_object(load_config(EvalConfig, [], list(overrides))).model

    # no architecture file beside the weights (a built-in model's export): eval's old default
    assert model(f"model.pretrained={weights}").name == "ViT-B-32"
    (export / "summary.json").write_text("{}")  # other JSON is not an architecture
    (export / "my-clip.json").write_text(json.dumps(TINY_CLIP))
    m = model(f"model.pretrained={weights}")
    assert (m.name, m.custom) == ("my-clip", TINY_CLIP)
    assert model(f"model.pretrained={weights}", "model.name=ViT-B-16").name == "ViT-B-16"  # a name given is kept
    (export / "other.json").write_text(json.dumps(TINY_CLIP))
    with pytest.raises(ConfigError, match=r"^model.name=auto: .* holds 2 architecture files \(my-clip.json, "
                                          r"other.json\); set model.name to one of them$"):
        model(f"model.pretrained={weights}")


def test_weights_of_another_architecture_are_one_line(tmp_path):
    import open_clip
    import torch

    from realsyn_pl.models.factory import load_weights, register_model_config

    register_model_config(TINY_NAME, TINY_CLIP)
    register_model_config("own-data-wider", {**TINY_CLIP, "embed_dim": 48})
    path = tmp_path / "wider.pt"
    torch.save(open_clip.create_model("own-data-wider").state_dict(), path)
    with pytest.raises(ConfigError, match=rf"^model.pretrained={path}: these weights do not fit model {TINY_NAME} "):
        load_weights(open_clip.create_model(TINY_NAME), str(path), TINY_NAME)


def test_resized_images_and_pngs_follow_the_release_recipe(tmp_path, capsys):
    photos = tmp_path / "p"
    photos.mkdir()
    Image.new("RGB", (600, 300), (10, 20, 30)).save(photos / "wide.png")
    (photos / "wide.txt").write_text("wide")
    assert main(["shards", f"input={photos}", f"output_dir={tmp_path / 'o'}", "fetcher=builtin",
                 "image_size=64"]) == 0
    got = members(tmp_path / "o" / "00000.tar")
    meta = json.loads(got["000000000.json"])  # keys of shards of 10,000 rows: 4 + 5 digits, as img2dataset's
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (128, 64, 600, 300)
    assert Image.open(io.BytesIO(got["000000000.jpg"])).format == "JPEG"

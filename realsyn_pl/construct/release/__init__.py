"""The RealSyn shards: write.py (balanced pairs -> webdataset + parquet index, stage `write`), card.py (the dataset
card), imaging.py (img2dataset's resize rules), official.py (the published RealSyn parquet -> shards, `release`),
via_img2dataset.py (that stage through the authors' img2dataset recipe)."""

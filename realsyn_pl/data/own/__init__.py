"""`shards`: your own image-caption data (a folder of image + caption files, or a table of path or URL + caption)
-> webdataset shards in the released layout that `fit` reads (.jpg, .txt = the caption, .json as img2dataset writes
it, sizes.json beside them).

inputs.py turns the input into rows and counts what cannot be a sample (tables.py reads the table files); fetch.py
writes the shards, through img2dataset when it is installed (the builtin fetcher otherwise); run.py checks the config
and the output folder and prints the summary with the `fit` command to run next.
"""

"""The benchmark (`python -m tools.bench`, `make bench`), cut along its phases:

__main__.py   the command line and the run
plan.py       what is measured: modes, sizes, targets, Plan and QUICK, the server's environment, the images
local.py      in-process timings of the predictor, rle.encode against mask2rle
over_http.py  over HTTP: cold, warm, prewarmed and concurrent clicks, the cache fill
report.py     statistics, the machine, the targets met or missed, the tables
"""

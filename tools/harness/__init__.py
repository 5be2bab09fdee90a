"""The one test and benchmark harness, shared by tools/ and tests/:

processes.py          free ports, bounded waits, the process runner and GunicornBackend, /proc readings
stub_label_studio.py  LoopbackServer and FakeLabelStudio (Label Studio's media serving, token checked)
recordings.py         the request bodies a real Label Studio sent (bodies/*.json) and helpers to replay them
scenes.py             synthetic scenes with known masks
"""

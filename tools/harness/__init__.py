"""The one test and benchmark harness, shared by tools/ and tests/: processes, a stand-in Label Studio,
the recorded Label Studio request bodies (bodies/) and the synthetic scenes with known masks."""
from pathlib import Path

#: What a real Label Studio sent the backend, recorded once (see tests/e2e/test_browser.py for how).
RECORDINGS = Path(__file__).resolve().parent / "bodies"

"""Project jobs: a whole Label Studio project embedded ahead and pre-annotated in the background.

`runner.ProjectJob` walks a project's tasks page by page through the Label Studio API (`api`, every call
`polite`), and for each task asks a `runner.TaskWorker` (the server's `SamModel`) to embed its image into the
state store and to turn its boxes, or SAM's automatic masks, into predictions it then writes to Label Studio.
Progress and resumption live in the state store (`progress`). Started by `python -m tools.project_job` or by
Label Studio's "Start training" (`POST /webhook`, action START_TRAINING).
"""

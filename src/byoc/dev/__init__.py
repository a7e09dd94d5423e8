"""Development tools, never imported by the runtime (``byoc.serve``).

``orchestrator/`` (a local go-livepeer stand-in), ``check/`` (the production checklist), ``bench/``,
``demo``, ``publish`` (ffmpeg to trickle), the trickle test server and the synthetic source.
"""

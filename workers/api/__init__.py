"""The HTTP hook API (``POST /api/enqueue``, ``GET /api/tracks``) for Lidarr, beets and Picard, and its tokens.

``tokens`` makes, checks and revokes the per-token API keys (only a digest is
stored); ``ratelimit`` is the fixed-window limit per token and per client IP;
``views`` are the two endpoints, each request logged to ``earmark.api``.
Just below layer 4: may import ``workers.library`` and everything beneath it; the
admin and the ``api_token`` command manage tokens through ``tokens``. Never torch.
"""

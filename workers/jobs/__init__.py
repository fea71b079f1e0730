"""The queue core: enqueue, claim, complete, fail and retry (``queue``); every SQLite/PostgreSQL
difference (``dialect``); worker identity and heartbeats (``registry``); maintenance; the one worker
loop (``runtime``); process and GPU pinning. Imports only ``workers.models``: concerns above register
their maintenance services here (``maintenance.register``) instead of being imported.
"""

"""What the admin shows live: the state broker (the only ``send_event`` caller), staff-only channels,
snapshots read from the database, the dashboard views, SVG plots and the supervisord client.
May import ``workers.jobs``, ``workers.library``, tagging's torch-free parts and the models; never torch.
"""

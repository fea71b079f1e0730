"""Earmark's tables: libraries and tracks, the job queues, and the meta key/value channel.

All live state is here, so that every process (and the admin) reads the same
truth; no worker keeps anything in memory that another process needs.
"""
from django.db import models
from django.db.models import Q


def default_standard_limits() -> dict:
    return {"genre": 2, "mood": 2}


class Library(models.Model):
    class WriteMode(models.TextChoices):
        NONE = "none", "none (scores only)"
        MINIMAL = "minimal", "minimal (category lists and version)"
        FULL = "full", "full (plus per-label scores)"

    name = models.CharField(max_length=200, unique=True)
    root = models.CharField(max_length=4096, help_text="Absolute path of the library's root directory.")
    enabled = models.BooleanField(default=True)
    class StandardTags(models.TextChoices):  # workers.tagfiles.standard.POLICIES
        OFF = "off", "off (Earmark's namespace only)"
        FILL_EMPTY = "fill-empty", "fill empty (only where the file has none)"
        APPEND = "append", "append (after the user's values)"
        REPLACE = "replace", "replace (the user's values kept to restore)"

    write_mode = models.CharField(max_length=10, choices=WriteMode.choices, default=WriteMode.MINIMAL)
    standard_tags = models.CharField(
        max_length=12, choices=StandardTags.choices, default=StandardTags.FILL_EMPTY,
        help_text="What goes into the standard genre and mood fields that players read.")
    standard_limits = models.JSONField(
        default=default_standard_limits, blank=True,
        help_text='Categories written to standard fields and how many values at most, e.g. {"genre": 2, "mood": 2}.')
    id3v23_separator = models.CharField(max_length=8, default="/",
                                        help_text="Joins several values in ID3v2.3 files (v2.4 files hold lists).")

    class KeyNotation(models.TextChoices):  # workers.features.extract.Features key forms
        STANDARD = "standard", "standard (Am, F#)"
        CAMELOT = "camelot", "Camelot (8A, 2B)"
        OPEN_KEY = "open", "Open Key (1m, 10d)"

    class Analysis(models.TextChoices):
        FAST = "fast", "fast (stops scoring once the tags have converged)"
        FULL = "full", "full (every patch of every file)"

    class Watch(models.TextChoices):
        AUTO = "auto", "auto (inotify where it works, else polling)"
        INOTIFY = "inotify", "inotify"
        POLL = "poll", "poll"
        OFF = "off", "off (scans only when asked)"

    key_notation = models.CharField(max_length=10, choices=KeyNotation.choices, default=KeyNotation.STANDARD,
                                    help_text="How the musical key is written to the file's standard key field.")
    analysis = models.CharField(max_length=8, choices=Analysis.choices, default=Analysis.FAST,
                                help_text="How much of each file the networks score.")
    watch = models.CharField(max_length=10, choices=Watch.choices, default=Watch.AUTO,
                             help_text="How the watcher notices new and changed files.")
    poll_seconds = models.PositiveIntegerField(default=300,
                                               help_text="Polling interval where the library is polled.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_scan_at = models.DateTimeField(null=True, blank=True)
    last_scan_error = models.TextField(blank=True, default="")

    class Meta:
        verbose_name_plural = "libraries"
        ordering = ["name"]

    def __str__(self):
        return self.name


class Track(models.Model):
    class State(models.TextChoices):
        NEW = "new"
        SCANNED = "scanned"
        TAGGED = "tagged"
        FAILED = "failed"
        MISSING = "missing"

    library = models.ForeignKey(Library, on_delete=models.CASCADE, related_name="tracks")
    # Paths are stored escaped (workers.library.paths) so that names with undecodable
    # bytes survive the round trip through a UTF-8 database exactly.
    path = models.TextField(unique=True)
    folder = models.TextField(db_index=True)
    size = models.BigIntegerField(null=True, blank=True)
    mtime_ns = models.BigIntegerField(null=True, blank=True)
    format = models.CharField(max_length=16, blank=True, default="")
    codec = models.CharField(max_length=32, blank=True, default="")
    duration = models.FloatField(null=True, blank=True)
    sample_rate = models.IntegerField(null=True, blank=True)
    channels = models.IntegerField(null=True, blank=True)
    bitrate = models.IntegerField(null=True, blank=True)
    artist = models.CharField(max_length=500, blank=True, default="")
    album = models.CharField(max_length=500, blank=True, default="")
    title = models.CharField(max_length=500, blank=True, default="")
    tags = models.JSONField(default=dict, blank=True, help_text="The user's own tags, as read at scan time.")
    state = models.CharField(max_length=10, choices=State.choices, default=State.NEW, db_index=True)
    error = models.TextField(blank=True, default="")
    earmark_tags = models.JSONField(default=dict, blank=True,
                                    help_text="The category lists Earmark last wrote (or would write) for this file.")
    genre_low_confidence = models.BooleanField(
        default=False, help_text="No genre passed its threshold: the best one above the floor was written.")
    # File identity, so that a moved or renamed file keeps its row (and its analysis).
    device = models.BigIntegerField(null=True, blank=True)
    inode = models.BigIntegerField(null=True, blank=True)
    audio_fingerprint = models.CharField(max_length=64, blank=True, default="",
                                         help_text="Digest of the audio stream, which tag writes do not change.")
    # Tempo, key and loudness (workers.features), measured on the native-rate decode.
    features = models.JSONField(default=dict, blank=True, help_text="Everything workers.features measured.")
    features_version = models.CharField(max_length=100, blank=True, default="")
    bpm = models.FloatField(null=True, blank=True, db_index=True)
    bpm_confidence = models.FloatField(null=True, blank=True)
    musical_key = models.CharField(max_length=12, blank=True, default="", db_index=True,
                                   help_text='Key and mode, e.g. "A minor".')
    key_confidence = models.FloatField(null=True, blank=True)
    loudness_lufs = models.FloatField(null=True, blank=True, db_index=True,
                                      help_text="Integrated loudness (EBU R128).")
    track_gain_db = models.FloatField(null=True, blank=True, help_text="ReplayGain 2.0 track gain (-18 LUFS).")
    track_peak = models.FloatField(null=True, blank=True, help_text="True peak, linear.")
    album_gain_db = models.FloatField(null=True, blank=True)
    album_peak = models.FloatField(null=True, blank=True)
    model_version = models.CharField(max_length=100, blank=True, default="")
    calibration_version = models.CharField(max_length=100, blank=True, default="")
    scan_gen = models.IntegerField(default=0, help_text="The library scan that last saw this file.")
    scanned_at = models.DateTimeField(null=True, blank=True)
    tagged_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["library", "state"], name="track_library_state"),
                   models.Index(fields=["device", "inode"], name="track_device_inode")]

    def __str__(self):
        return self.path


class Job(models.Model):
    """One row per unit of work, for all queues (``scan``, ``tag``, ``calibrate``)."""

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)
    FINISHED_STATES = (State.DONE, State.FAILED, State.CANCELLED)

    queue = models.CharField(max_length=20)
    key = models.CharField(max_length=300, help_text="Dedup key: one active job per (queue, key).")
    payload = models.JSONField(default=dict, blank=True)
    track = models.ForeignKey(Track, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    library = models.ForeignKey(Library, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    priority = models.IntegerField(default=100, help_text="Lower runs first.")
    attempts = models.IntegerField(default=0)
    max_attempts = models.IntegerField(default=3)
    run_after = models.DateTimeField()
    claimed_by = models.CharField(max_length=300, blank=True, default="")
    boot_id = models.CharField(max_length=40, blank=True, default="")
    lease_expires = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    result = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["queue", "key"],
                condition=Q(state__in=["queued", "running"]),
                name="job_one_active_per_key",
            ),
        ]
        indexes = [
            # The claim: queued jobs of one queue in (priority, id) order.
            models.Index(fields=["queue", "priority", "id"], condition=Q(state="queued"), name="job_claim"),
            # Rescue and lease extension look only at running jobs.
            models.Index(fields=["claimed_by"], condition=Q(state="running"), name="job_running_by"),
            models.Index(fields=["queue", "state"], name="job_queue_state"),
            # Pruning finished jobs by age.
            models.Index(fields=["finished_at"], condition=Q(state__in=["done", "failed", "cancelled"]), name="job_finished"),
        ]

    def __str__(self):
        return f"{self.queue}:{self.key} ({self.state})"


class Meta(models.Model):
    """Key/value rows: the IPC channel between processes.

    ``worker:<host>:<queue>:<n>`` rows are live workers (their ``updated_at`` is
    the heartbeat); ``queue:<name>:paused`` and similar rows are flags.
    """

    key = models.CharField(max_length=300, primary_key=True)
    value = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "meta entry"
        verbose_name_plural = "meta"

    def __str__(self):
        return self.key


class TrackTag(models.Model):
    """One value Earmark wrote for a track (``genre: ambient``), with its calibrated strength.

    ``Track.earmark_tags`` holds the same lists as JSON for display; this
    table is what the admin filters, counts and searches on, with an index
    per (category, value), so that "every calm track" and "how many tracks
    per mood" stay fast at 100,000 tracks. Rows are replaced whenever a
    track's tags are recorded (``workers.tagging.records``).
    """

    track = models.ForeignKey(Track, on_delete=models.CASCADE, related_name="tag_rows")
    category = models.CharField(max_length=16)
    value = models.CharField(max_length=64)
    rank = models.SmallIntegerField(default=0, help_text="0 for the strongest value of its category.")
    strength = models.FloatField(null=True, blank=True,
                                 help_text="Calibrated strength, 0 (clearly absent) to 1 (clearly present).")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["track", "category", "value"], name="tracktag_unique")]
        indexes = [models.Index(fields=["category", "value"], name="tracktag_category_value")]

    def __str__(self):
        return f"{self.category}: {self.value}"


class Score(models.Model):
    """A track's raw model outputs: per label, the mean and spread over its 3 s patches.

    Kept so that recalibration rewrites tags without running the networks.
    Stored as little-endian float32 vectors in the order of ``labels``
    (``workers.tagging.scores`` packs and unpacks them): compact, and a whole
    library loads into one numpy matrix in a second.
    """

    track = models.OneToOneField(Track, on_delete=models.CASCADE, related_name="score", primary_key=True)
    model_version = models.CharField(max_length=100)
    labels_version = models.CharField(max_length=40, help_text="Digest of the label list the vectors follow.")
    means = models.BinaryField()
    spreads = models.BinaryField()
    patches = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"scores of track {self.track_id}"


class Calibration(models.Model):
    """Per-label statistics of the library's stored scores: what "high" means for each label here.

    ``stats`` maps each label id (``"mtt:guitar"``) to its 5th and 95th
    percentile over the library's tracks (``p5``, ``p95``: the calibrated
    strength is 0 at p5 and 1 at p95) and a 100-bin histogram over
    ``[min, max]`` (``counts``) for the admin's plots. ``version`` is a digest
    of the model version and the percentiles, so computing twice from the
    same scores gives the same version and rewrites no file.
    ``workers.calibration.compute`` computes, activates, exports and imports them.
    """

    version = models.CharField(max_length=100, unique=True)
    model_version = models.CharField(max_length=100, help_text="The networks whose scores these statistics describe.")
    stats = models.JSONField(default=dict)
    track_count = models.IntegerField(default=0, help_text="Tracks the statistics were computed over.")
    source = models.CharField(max_length=500, blank=True, default="computed")
    seconds = models.FloatField(null=True, blank=True, help_text="Time the computation took.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return self.version


class ApiToken(models.Model):
    """A key for the HTTP API (hooks from Lidarr, beets, Picard), scoped to libraries.

    Only a digest of the secret is stored; ``prefix`` finds the row, the digest
    proves the secret. A revoked token is kept, so its requests stay attributable.
    """

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=128)
    libraries = models.ManyToManyField(Library, blank=True, related_name="api_tokens")
    created_by = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="api_tokens")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

#!/usr/bin/env bash
# Lidarr → Settings → Connect → + → Custom Script, Path: this file. Tick On Release Import,
# On Upgrade, On Rename and On Track Retag. Lidarr passes what happened in lidarr_* variables;
# this queues the files it imported (or the artist folder it renamed in) for Earmark's tagger.
# Lidarr's "Test" button runs it with lidarr_eventtype=Test: it checks Earmark can be started.
# EARMARK_WAIT=1 makes Lidarr's log show the tags written (the import waits for the tagger).
set -euo pipefail
enqueue="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/earmark-enqueue"
case "${lidarr_eventtype:-}" in
  Test) exec "$enqueue" --help >/dev/null ;;
  Download|AlbumDownload) list="${lidarr_addedtrackpaths:-}" ;;  # "|"-separated imported files
  TrackRetag) list="${lidarr_trackfile_path:-}" ;;
  Rename) list="${lidarr_artist_path:-}" ;;  # new names and gone old ones: the artist folder has both
  *) exit 0 ;;  # grabs, health, deletions: nothing to tag
esac
[ -n "$list" ] || exit 0
IFS='|' read -r -a paths <<< "$list"
wait=()
[ "${EARMARK_WAIT:-0}" = 1 ] && wait=(--wait --timeout "${EARMARK_WAIT_TIMEOUT:-600}")
exec "$enqueue" "${paths[@]}" "${wait[@]}"

"""Watching the roots for changes: inotify, the mount table, and what the kernel lets us watch."""

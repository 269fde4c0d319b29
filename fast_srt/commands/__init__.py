"""One module per `fast-srt` command (train, play); nothing imports them but fast_srt.cli."""

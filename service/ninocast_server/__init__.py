"""ninocast_server: the nowcasting engine (neural graphs, nowcasters) and the HTTP server."""

# What a session that names no nowcaster gets, in the server (NINOCAST_DEFAULT_NOWCASTER's default) and in local
# mode (nowcaster="default"): our own graph model, bundled in models/; its measured speedup is in docs/metatrain.md.
# (linefit, the earlier default, wrecks training with NiNo's k schedule.)
DEFAULT_NOWCASTER = "ninocast-nino"

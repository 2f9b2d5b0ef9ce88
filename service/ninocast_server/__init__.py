"""ninocast_server: the nowcasting engine (neural graphs, nowcasters) and the HTTP server."""

"""`diffgem serve`: the OpenAI-compatible HTTP server and its request engine."""

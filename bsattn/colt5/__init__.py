"""CoLT5 conditional routing (coordinate-descent top-k, routers, routed layers)."""

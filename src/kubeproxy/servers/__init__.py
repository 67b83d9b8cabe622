"""HTTP servers at the proxy's edge (DESIGN.md section 2): each runs aiohttp on its own thread and
event loop, so answers stay fast while a sync burns CPU, and reads state only through snapshots."""

"""A stand-in for a user's own package: ``--model mypkg.models:make_net`` (tests/ on
PYTHONPATH, as a user's project folder would be)."""

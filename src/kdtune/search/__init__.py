"""Searches that produce distillation schemes a plain run replays (DistPro: :mod:`kdtune.search.distpro`)."""

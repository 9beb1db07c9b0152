"""Grain data sources for soraax: synthetic captioned clips, folders of videos, TFDS ArrayRecord."""

"""The commands: ``bucket-report``, ``bucket-cache`` and ``bucket-caption`` (composition)."""

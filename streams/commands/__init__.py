"""The operator commands behind the CLI, one file each (`common` holds what they share)."""

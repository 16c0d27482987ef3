"""What the service and its clients share on the wire: rows, formats, text and vector checks,
order statistics (numpy and pyarrow only)."""

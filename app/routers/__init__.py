"""One router per resource; each parses, authorises, calls a domain function and shapes the answer."""

"""iptables rules for transparent interception (`meshlet init`); see `rules`."""

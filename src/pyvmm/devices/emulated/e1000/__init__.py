"""Intel 82540EM (e1000) Gigabit Ethernet: see nic.py."""

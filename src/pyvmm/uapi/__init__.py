"""Constants and structures named as in the Linux UAPI headers and device specs."""

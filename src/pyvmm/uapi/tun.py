"""``<linux/if_tun.h>`` names pyvmm uses."""

from pyvmm.uapi.ioctl import _IOW

TUNSETIFF = _IOW(ord("T"), 202, 4)
TUNSETOFFLOAD = _IOW(ord("T"), 208, 4)
TUNSETVNETHDRSZ = _IOW(ord("T"), 216, 4)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
IFNAMSIZ = 16

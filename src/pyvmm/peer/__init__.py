"""What the peer-facing servers (vhost-user, vfio-user) share: one framed,
non-blocking message channel per peer, the listening socket, and checks on the fds a
peer hands over. Nothing here imports ``kvm`` or ``machine``: a backend process has
neither."""

from pyvmm.peer.channel import ChannelLimits, MessageChannel, close_fds
from pyvmm.peer.fds import PeerError, checked_eventfd, signal_eventfd
from pyvmm.peer.listener import UnixListener

__all__ = ["ChannelLimits", "MessageChannel", "PeerError", "UnixListener", "checked_eventfd",
           "close_fds", "signal_eventfd"]

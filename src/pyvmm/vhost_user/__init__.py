"""vhost-user: a message codec named as in the spec, and a backend server that hosts
pyvmm's own virtio device logic for other VMMs' front ends."""

/* virtio-rng: read 64 bytes twice from the first virtio-rng PCI device. */
#include "virtio.h"

static u8 a[64], b[64];

int main(void)
{
    uart_init();
    struct vdev v;
    struct vq q;
    if (virtio_find(&v, 4))
        fail("no virtio-rng");
    if (virtio_negotiate(&v, 0) || virtio_queue_setup(&v, &q, 0, 16, 0xffff))
        fail("setup");
    virtio_driver_ok(&v);
    struct vbuf ba = { a, 64, 1 }, bb = { b, 64, 1 };
    vq_submit(&q, &ba, 1);
    i64 na = vq_wait(&q, 4000000000ul);
    vq_submit(&q, &bb, 1);
    i64 nb = vq_wait(&q, 4000000000ul);
    if (na != 64 || nb != 64) fail("short entropy: %ld %ld", na, nb);
    if (!memcmp(a, b, 64)) fail("two reads are equal");
    printf("virtio-rng ok: %02x%02x%02x%02x...\n", a[0], a[1], a[2], a[3]);
    return 0;
}

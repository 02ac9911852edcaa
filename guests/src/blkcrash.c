/* blkcrash: n= writes of 4 KiB in order, write i going to block i % blocks= and holding
 * (i, seed=) and a pattern made from both, with a FLUSH after every flush_every= writes. After each FLUSH that
 * completes with OK it prints "durable <i>": every write up to block i was acknowledged
 * before that flush was. A host that kills the VMM at any moment must leave every
 * block up to the last "durable" line in the image. A write or flush that fails prints
 * "ioerr <i> <status>" and the guest exits 3 (the device's answer, not a crash). */
#include "virtio.h"

#define VIRTIO_BLK_F_FLUSH 9
static u64 block[512] __attribute__((aligned(4096)));


int main(void)
{
    uart_init();
    u64 n = arg_u64("n", 1000), seed = arg_u64("seed", 1), every = arg_u64("flush_every", 8);
    u64 blocks = arg_u64("blocks", 2048);
    struct vdev v;
    struct vq q;
    u32 slot;
    if (virtio_pci_find(0x1042, &slot) || virtio_pci_init(&v, slot))
        fail("no virtio-blk");
    if (virtio_negotiate(&v, 1ul << VIRTIO_BLK_F_FLUSH))
        fail("FEATURES_OK refused");
    if (virtio_queue_setup(&v, &q, 0, 64, 0xffff))
        fail("queue setup");
    virtio_driver_ok(&v);
    printf("blkcrash n=%lu seed=%lu\n", n, seed);
    for (u64 i = 0; i < n; i++) {
        block[0] = i;
        block[1] = seed;
        for (int w = 2; w < 512; w++)
            block[w] = (i * 0x9e3779b97f4a7c15ul) ^ (seed << 32) ^ (u64)w;
        int st = virtio_blk_io(&q, 1, (i % blocks) * 8, block, sizeof block);
        if (st) {
            printf("ioerr %lu %d\n", i, st);
            return 3;
        }
        if ((i + 1) % every == 0 || i + 1 == n) {
            st = virtio_blk_io(&q, 4, 0, 0, 0); /* VIRTIO_BLK_T_FLUSH */
            if (st) {
                printf("ioerr %lu %d\n", i, st);
                return 3;
            }
            printf("durable %lu\n", i);
        }
    }
    printf("blkcrash done\n");
    return 0;
}

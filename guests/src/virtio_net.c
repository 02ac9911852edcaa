/* virtio-net: bring up the first virtio-net PCI device with MAC and MRG_RXBUF, post 16
 * receive buffers of 2048 bytes, transmit one frame (ethertype 0x88b5, payload
 * "pyvmm-tx <seed>"), then print every frame received until one whose payload starts
 * with "pyvmm-end": its length, the number of buffers it arrived in (num_buffers), and
 * a checksum of the payload. bench=N: N ping-pongs with a host echo instead
 * (bench/nic.py). */
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define HDR 12
#define NRX 16
#define RXSZ 2048

static u8 rxbuf[NRX][RXSZ] __attribute__((aligned(64)));
static u8 txbuf[2048] __attribute__((aligned(64)));
static u8 frame[16384];

static void post_rx(struct vq *q, u16 i)
{
    q->desc[i] = (struct vring_desc){ (u64)rxbuf[i], RXSZ, 2, 0 };
    q->avail->ring[q->avail_idx % q->size] = i;
    q->avail_idx++;
    __asm__ volatile("" ::: "memory");
    q->avail->idx = q->avail_idx;
}

static int next_used(struct vq *q, u32 *id, u32 *len)
{
    for (u64 spins = 0; spins < 8000000000ul; spins++) {
        if (*(volatile u16 *)&q->used->idx != q->last_used) {
            __asm__ volatile("" ::: "memory");
            struct vring_used_elem e = q->used->ring[q->last_used % q->size];
            q->last_used++;
            *id = e.id;
            *len = e.len;
            return 0;
        }
        cpu_relax();
    }
    return -1;
}

/* bench=N: N ping-pongs with a host echo (dst 02:00:00:00:00:01; bench/nic.py): a
 * 64-byte frame out, the echo back, guest TSC per round trip. */
static u64 rtt[4096];

static void bench(struct vq *rx, struct vq *tx, const u8 *mac, u32 n)
{
    if (n > 4096) n = 4096;
    u32 id, len;
    for (u32 k = 0; k < n; k++) {
        memset(txbuf, 0, HDR + 64);
        u8 *eth = txbuf + HDR;
        eth[0] = 0x02; eth[5] = 0x01;
        memcpy(eth + 6, mac, 6);
        eth[12] = 0x88; eth[13] = 0xb5;
        snprintf((char *)eth + 14, 32, "pyvmm-ping %u", k);
        struct vbuf b = { txbuf, HDR + 64, 0 };
        u64 t0 = rdtsc();
        vq_submit(tx, &b, 1);
        if (next_used(tx, &id, &len)) fail("tx did not complete");
        if (next_used(rx, &id, &len)) fail("no echo for ping %u", k);
        rtt[k] = rdtsc() - t0;
        post_rx(rx, (u16)id);
        virtio_kick(rx);
    }
    for (u32 gap = n / 2; gap; gap /= 2)   /* shell sort for the percentiles */
        for (u32 i = gap; i < n; i++)
            for (u32 j = i; j >= gap && rtt[j - gap] > rtt[j]; j -= gap) {
                u64 t = rtt[j]; rtt[j] = rtt[j - gap]; rtt[j - gap] = t;
            }
    printf("virtio-net-bench rtts=%u p50_cycles=%lu p99_cycles=%lu\n", n, rtt[n / 2],
           rtt[n * 99 / 100]);
}

int main(void)
{
    uart_init();
    struct vdev v;
    struct vq rx, tx;
    if (virtio_find(&v, 1)) fail("no virtio-net");
    if (virtio_negotiate(&v, (1ul << VIRTIO_NET_F_MAC) | (1ul << VIRTIO_NET_F_MRG_RXBUF)))
        fail("FEATURES_OK refused");
    if (virtio_queue_setup(&v, &rx, 0, NRX, 0xffff) || virtio_queue_setup(&v, &tx, 1, 16, 0xffff))
        fail("queue setup");
    for (u16 i = 0; i < NRX; i++) post_rx(&rx, i);
    rx.avail->flags = tx.avail->flags = 1;          /* polling: no interrupts */
    virtio_driver_ok(&v);
    u8 mac[6];
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(v.device + i);
    printf("virtio-net mac=%02x:%02x:%02x:%02x:%02x:%02x features=%lx\n", mac[0], mac[1],
           mac[2], mac[3], mac[4], mac[5], v.features);
    virtio_kick(&rx);
    if (arg_u64("bench", 0)) {
        bench(&rx, &tx, mac, (u32)arg_u64("bench", 0));
        return 0;
    }

    /* transmit: vnet header (all zero: no offload) + Ethernet frame */
    memset(txbuf, 0, HDR);
    u8 *eth = txbuf + HDR;
    memset(eth, 0xff, 6);
    memcpy(eth + 6, mac, 6);
    eth[12] = 0x88; eth[13] = 0xb5;
    int plen = snprintf((char *)eth + 14, 100, "pyvmm-tx %lu", arg_u64("seed", 0));
    struct vbuf b = { txbuf, (u32)(HDR + 14 + plen + 1), 0 };
    vq_submit(&tx, &b, 1);
    u32 id, len;
    if (next_used(&tx, &id, &len)) fail("tx did not complete");
    printf("tx done\n");

    for (;;) {
        if (next_used(&rx, &id, &len)) fail("no frame received");
        u16 nbuf = *(u16 *)(rxbuf[id] + 10);
        u32 total = 0;
        memcpy(frame, rxbuf[id] + HDR, len - HDR);
        total = len - HDR;
        post_rx(&rx, (u16)id);
        for (u16 k = 1; k < nbuf; k++) {
            if (next_used(&rx, &id, &len)) fail("merged frame incomplete");
            if (total + len > sizeof frame) fail("frame too big");
            memcpy(frame + total, rxbuf[id], len);
            total += len;
            post_rx(&rx, (u16)id);
        }
        virtio_kick(&rx);
        u32 sum = 0;
        for (u32 i = 14; i < total; i++) sum = sum * 31 + frame[i];
        char head[21];
        u32 hl = total - 14 < 20 ? total - 14 : 20;
        memcpy(head, frame + 14, hl);
        head[hl] = 0;
        for (u32 i = 0; i < hl; i++)
            if (head[i] < 32 || head[i] > 126) head[i] = '.';
        printf("rx len=%u nbuf=%u sum=%x payload=%s\n", total, nbuf, sum, head);
        if (!memcmp(frame + 14, "pyvmm-end", 9))
            break;
    }
    return 0;
}

/* virtio-console: say "console ready" on the first virtio-console PCI device, then echo
 * what arrives upper-cased until a newline; exit code = bytes received & 0x3f.
 * bench=N: instead, N 64-byte lines out, each timed by the TSC until it is sent — on
 * the virtio-console (bench_dev=1: until the device has used the buffer) or on COM1
 * (bench_dev=0: byte by byte, each waiting for THRE) — and one result line on COM1
 * (pyvmm compare's console rows). */
#include "virtio.h"

#define NRX 8
static u8 rxb[NRX][64];
static u8 txb[128];

static void post(struct vq *q, u16 i)
{
    q->desc[i] = (struct vring_desc){ (u64)rxb[i], 64, 2, 0 };
    q->avail->ring[q->avail_idx % q->size] = i;
    q->avail_idx++;
    __asm__ volatile("" ::: "memory");
    q->avail->idx = q->avail_idx;
}

static void send(struct vq *tx, const void *p, u32 n)
{
    memcpy(txb, p, n);
    struct vbuf b = { txb, n, 0 };
    vq_submit(tx, &b, 1);
    if (vq_wait(tx, 4000000000ul) < 0) fail("tx stuck");
}

static u64 lat[4096];

static void bench(struct vq *tx, u32 n, int dev)
{
    static const char line[65] =
        "pyvmm console bench line: 64 bytes out, timed by the guest TSC.\n";
    if (n > 4096)
        n = 4096;
    for (u32 k = 0; k < n; k++) {
        u64 t0 = rdtsc();
        if (dev)
            send(tx, line, 64);
        else
            for (u32 i = 0; i < 64; i++)
                putc(line[i]);
        lat[k] = rdtsc() - t0;
    }
    for (u32 i = 1; i < n; i++)              /* insertion sort: n is small */
        for (u32 j = i; j > 0 && lat[j - 1] > lat[j]; j--) {
            u64 t = lat[j]; lat[j] = lat[j - 1]; lat[j - 1] = t;
        }
    printf("console-bench dev=%s lines=%u p50_cycles=%lu p99_cycles=%lu\n",
           dev ? "virtio" : "uart", n, lat[n / 2], lat[n * 99 / 100]);
}

int main(void)
{
    uart_init();
    struct vdev v;
    struct vq rx, tx;
    if (virtio_find(&v, 3)) fail("no virtio-console");
    if (virtio_negotiate(&v, 0) || virtio_queue_setup(&v, &rx, 0, NRX, 0xffff) ||
        virtio_queue_setup(&v, &tx, 1, 8, 0xffff))
        fail("setup");
    for (u16 i = 0; i < NRX; i++) post(&rx, i);
    virtio_driver_ok(&v);
    virtio_kick(&rx);
    u64 nbench = arg_u64("bench", 0);
    if (nbench) {
        bench(&tx, (u32)nbench, (int)arg_u64("bench_dev", 1));
        return 0;
    }
    send(&tx, "console ready\n", 14);
    u32 total = 0;
    for (;;) {
        i64 n = vq_wait(&rx, 8000000000ul);
        if (n < 0) fail("no input");
        u16 id = rx.used->ring[(u16)(rx.last_used - 1) % rx.size].id;
        u8 *p = rxb[id];
        int end = 0;
        for (i64 i = 0; i < n; i++) {
            if (p[i] >= 'a' && p[i] <= 'z') p[i] = (u8)(p[i] - 32);
            if (p[i] == '\n') end = 1;
        }
        total += (u32)n;
        send(&tx, p, (u32)n);
        post(&rx, id);
        virtio_kick(&rx);
        if (end) break;
    }
    printf("virtio-console echoed %u bytes\n", total);
    return (int)(total & 0x3f);
}

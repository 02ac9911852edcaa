/* blkload: a virtio-blk load generator. qd= requests in flight (1-32), n= requests of
 * bs= bytes, mode= 0 random read, 1 sequential read, 2 sequential write; polls the
 * used ring with interrupts suppressed (VRING_AVAIL_F_NO_INTERRUPT). Prints IOPS and
 * MB/s (from the guest TSC at tsc_khz=) and latency percentiles in microseconds.
 * Works over virtio-pci (default) or virtio-mmio (mmio=1), against pyvmm or QEMU. */
#include "virtio.h"

#define MAXQD 32
struct blk_hdr { u32 type, reserved; u64 sector; };
static struct blk_hdr hdrs[MAXQD];
static u8 status[MAXQD];
static u64 started[MAXQD];
static u8 data[8u << 20] __attribute__((aligned(4096)));
static u32 lat[65536];

static u64 rng = 88172645463325252ul;
static u64 xorshift(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void sortu(u32 *a, u32 n)
{
    for (u32 gap = n / 2; gap; gap /= 2)
        for (u32 i = gap; i < n; i++)
            for (u32 j = i; j >= gap && a[j - gap] > a[j]; j -= gap) {
                u32 t = a[j]; a[j] = a[j - gap]; a[j - gap] = t;
            }
}

int main(void)
{
    uart_init();
    u32 qd = (u32)arg_u64("qd", 1), n = (u32)arg_u64("n", 2000), bs = (u32)arg_u64("bs", 4096);
    u32 mode = (u32)arg_u64("mode", 0);
    u64 khz = arg_u64("tsc_khz", 0);
    if (!qd || qd > MAXQD || (u64)qd * bs > sizeof data || bs % 512 || !khz)
        fail("bad qd/bs/tsc_khz");
    if (n > 65536) n = 65536;
    struct vdev v;
    struct vq q;
    u32 slot;
    u64 devcfg;
    if (arg_u64("mmio", 0)) {
        u64 bases[8];
        int nb = acpi_virtio_mmio_slots(bases, 8), found = -1;
        for (int i = 0; i < nb && found < 0; i++)
            if (virtio_mmio_setup(bases[i], 0, &q, 128, &v.features) == 2)
                found = i;
        if (found < 0) fail("no virtio-mmio blk");
        devcfg = bases[found] + 0x100;
    } else {
        if (virtio_pci_find(0x1042, &slot) || virtio_pci_init(&v, slot)) fail("no virtio-blk");
        if (virtio_negotiate(&v, 0) || virtio_queue_setup(&v, &q, 0, 128, 0xffff)) fail("setup");
        virtio_driver_ok(&v);
        devcfg = v.device;
    }
    u64 cap = *(volatile u32 *)devcfg | ((u64)*(volatile u32 *)(devcfg + 4) << 32);
    u64 span = cap / (bs / 512);
    if (span < qd) fail("disk too small");
    q.avail->flags = 1;                                  /* no interrupts: we poll */
    u32 issued = 0, done = 0, nfree = qd;
    u32 free_slots[MAXQD];
    for (u32 i = 0; i < qd; i++) free_slots[i] = qd - 1 - i;
    u64 seq = 0;
    for (u32 i = 0; i < qd * bs; i++) data[i] = (u8)(i * 7);
    u64 t_start = rdtsc();
    for (;;) {
        /* (re)issue into every free slot */
        while (issued < n && nfree) {
            u32 s = free_slots[--nfree];           /* completions may come in any order */
            u16 d = (u16)(3 * s);
            hdrs[s].type = mode == 2 ? 1 : 0;
            hdrs[s].sector = (mode == 0 ? xorshift() % span : (seq++ % span)) * (bs / 512);
            status[s] = 0xff;
            q.desc[d] = (struct vring_desc){ (u64)&hdrs[s], 16, 1, (u16)(d + 1) };
            q.desc[d + 1] = (struct vring_desc){ (u64)(data + (u64)s * bs), bs,
                                                 (u16)(1 | (mode == 2 ? 0 : 2)), (u16)(d + 2) };
            q.desc[d + 2] = (struct vring_desc){ (u64)&status[s], 1, 2, 0 };
            q.avail->ring[q.avail_idx % q.size] = d;
            q.avail_idx++;
            started[s] = rdtsc();
            issued++;
            __asm__ volatile("" ::: "memory");
            q.avail->idx = q.avail_idx;
            __asm__ volatile("mfence" ::: "memory");
            if (q.mmio) *(volatile u32 *)q.notify = 0; else *(volatile u16 *)q.notify = 0;
        }
        if (done == n)
            break;
        while (*(volatile u16 *)&q.used->idx == q.last_used)
            cpu_relax();
        while (*(volatile u16 *)&q.used->idx != q.last_used) {
            __asm__ volatile("" ::: "memory");          /* read the entry after idx */
            u32 id = ((volatile struct vring_used_elem *)q.used->ring)[q.last_used % q.size].id;
            q.last_used++;
            u32 s = id / 3;
            u8 st = ((volatile u8 *)status)[s];
            if (s >= qd || st) fail("request %u (slot %u) failed with status %u", id, s, st);
            free_slots[nfree++] = s;
            u64 l = rdtsc() - started[s];
            lat[done++] = (u32)(l > 0xffffffffu ? 0xffffffffu : l);
        }
    }
    u64 cycles = rdtsc() - t_start;
    sortu(lat, n);
    u64 us = cycles * 1000 / khz;
    printf("blkload mode=%u qd=%u bs=%u n=%u iops=%lu mbps=%lu p50_us=%lu p99_us=%lu\n",
           mode, qd, bs, n, us ? (u64)n * 1000000 / us : 0,
           us ? (u64)n * bs / us : 0, (u64)lat[n / 2] * 1000 / khz,
           (u64)lat[n * 99 / 100] * 1000 / khz);
    return 0;
}

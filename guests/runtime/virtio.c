#include "virtio.h"

#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4

/* common config offsets */
#define DFSELECT 0x00
#define DF 0x04
#define GFSELECT 0x08
#define GF 0x0c
#define MSIX 0x10
#define STATUS 0x14
#define Q_SELECT 0x16
#define Q_SIZE 0x18
#define Q_MSIX 0x1a
#define Q_ENABLE 0x1c
#define Q_NOFF 0x1e
#define Q_DESC 0x20
#define Q_AVAIL 0x28
#define Q_USED 0x30

static void w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static void w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static void w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static u8 r8(u64 a) { return *(volatile u8 *)a; }
static u16 r16(u64 a) { return *(volatile u16 *)a; }
static u32 r32(u64 a) { return *(volatile u32 *)a; }

int virtio_pci_find(u16 device_id, u32 *slot)
{
    for (u32 dev = 0; dev < 32; dev++) {
        u32 id = pci_read32(0, dev, 0, 0);
        if ((id & 0xffff) == 0x1af4 && (id >> 16) == device_id) {
            *slot = dev;
            return 0;
        }
    }
    return -1;
}

int virtio_pci_init(struct vdev *v, u32 slot)
{
    memset(v, 0, sizeof *v);
    v->slot = slot;
    pci_write16(0, slot, 0, 4, pci_read16(0, slot, 0, 4) | 6);   /* memory + bus master */
    u8 p = pci_read8(0, slot, 0, 0x34);
    for (int guard = 0; p && guard < 48; guard++) {
        if (pci_read8(0, slot, 0, p) == 0x09) {
            u8 type = pci_read8(0, slot, 0, p + 3), bar = pci_read8(0, slot, 0, p + 4);
            u64 addr = pci_bar_addr(0, slot, 0, bar) + pci_read32(0, slot, 0, p + 8);
            if (type == CAP_COMMON) v->common = addr;
            else if (type == CAP_ISR) v->isr = addr;
            else if (type == CAP_DEVICE) v->device = addr;
            else if (type == CAP_NOTIFY) {
                v->notify_base = addr;
                v->notify_mult = pci_read32(0, slot, 0, p + 16);
            }
        }
        p = pci_read8(0, slot, 0, p + 1);
    }
    return v->common && v->notify_base ? 0 : -1;
}

static int mmio_negotiate(struct vdev *v, u64 want);
static int mmio_queue_setup(struct vdev *v, struct vq *q, u16 index, u16 size);

u8 virtio_status(struct vdev *v)
{
    return v->mmio ? (u8)r32(v->mmio + 0x70) : r8(v->common + STATUS);
}

int virtio_negotiate(struct vdev *v, u64 want)
{
    if (v->mmio)
        return mmio_negotiate(v, want);
    w8(v->common + STATUS, 0);
    w8(v->common + STATUS, 1 | 2);                 /* ACKNOWLEDGE | DRIVER */
    w32(v->common + DFSELECT, 0);
    u64 f = r32(v->common + DF);
    w32(v->common + DFSELECT, 1);
    f |= (u64)r32(v->common + DF) << 32;
    v->features = f & (want | (1ul << VIRTIO_F_VERSION_1));
    w32(v->common + GFSELECT, 0);
    w32(v->common + GF, (u32)v->features);
    w32(v->common + GFSELECT, 1);
    w32(v->common + GF, (u32)(v->features >> 32));
    w8(v->common + STATUS, 1 | 2 | 8);             /* FEATURES_OK */
    return (r8(v->common + STATUS) & 8) ? 0 : -1;
}

static u8 ring_mem[8][3 * 4096] __attribute__((aligned(4096)));
static int ring_next;

/* One page each for the descriptor table, available and used rings (both transports). */
static int ring_alloc(struct vq *q, u16 size)
{
    if (ring_next >= 8)
        return -1;
    u8 *m = ring_mem[ring_next++];
    memset(m, 0, sizeof ring_mem[0]);
    q->size = size;
    q->desc = (struct vring_desc *)m;
    q->avail = (struct vring_avail *)(m + 4096);
    q->used = (struct vring_used *)(m + 8192);
    q->avail_idx = q->last_used = 0;
    return 0;
}

int virtio_queue_setup(struct vdev *v, struct vq *q, u16 index, u16 size, u16 msix)
{
    if (v->mmio)
        return mmio_queue_setup(v, q, index, size);
    w16(v->common + Q_SELECT, index);
    u16 max = r16(v->common + Q_SIZE);
    if (size > max) size = max;
    if (size > VQ_MAX) size = VQ_MAX;
    if (!max || ring_alloc(q, size))
        return -1;
    w16(v->common + Q_SIZE, size);
    w32(v->common + Q_DESC, (u32)(u64)q->desc);
    w32(v->common + Q_DESC + 4, 0);
    w32(v->common + Q_AVAIL, (u32)(u64)q->avail);
    w32(v->common + Q_AVAIL + 4, 0);
    w32(v->common + Q_USED, (u32)(u64)q->used);
    w32(v->common + Q_USED + 4, 0);
    w16(v->common + Q_MSIX, msix);
    q->notify = v->notify_base + (u64)r16(v->common + Q_NOFF) * v->notify_mult;
    q->index = index;
    q->mmio = 0;
    w16(v->common + Q_ENABLE, 1);
    return 0;
}

void virtio_driver_ok(struct vdev *v)
{
    if (v->mmio)
        w32(v->mmio + 0x70, 1 | 2 | 8 | 4);
    else
        w8(v->common + STATUS, 1 | 2 | 8 | 4);
}

u16 vq_submit(struct vq *q, const struct vbuf *bufs, int n)
{
    /* One request in flight at a time per queue: descriptors 0..n-1. */
    for (int i = 0; i < n; i++) {
        q->desc[i].addr = (u64)bufs[i].addr;
        q->desc[i].len = bufs[i].len;
        q->desc[i].flags = (u16)((i + 1 < n ? 1 : 0) | (bufs[i].write ? 2 : 0));
        q->desc[i].next = (u16)(i + 1 < n ? i + 1 : 0);
    }
    q->avail->ring[q->avail_idx % q->size] = 0;
    __asm__ volatile("" ::: "memory");
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
    __asm__ volatile("mfence" ::: "memory");
    virtio_kick(q);
    return 0;
}

i64 vq_wait(struct vq *q, u64 spins)
{
    while (spins--) {
        if (*(volatile u16 *)&q->used->idx != q->last_used) {
            struct vring_used_elem e = q->used->ring[q->last_used % q->size];
            q->last_used++;
            return e.len;
        }
        cpu_relax();
    }
    return -1;
}

/* --- ACPI discovery of virtio-mmio slots ------------------------------------------- */
extern u64 boot_info;

static u64 find_rsdp(void)
{
    if (boot_info && *(u32 *)boot_info == 0x336ec578u && *(u64 *)(boot_info + 32))
        return *(u64 *)(boot_info + 32);               /* PVH rsdp_paddr */
    for (u64 a = 0xe0000; a < 0x100000; a += 16)        /* the BIOS-area scan */
        if (!memcmp((void *)a, "RSD PTR ", 8))
            return a;
    return 0;
}

int acpi_virtio_mmio_slots(u64 *bases, int max)
{
    u64 rsdp = find_rsdp();
    if (!rsdp)
        return 0;
    u8 *xsdt = (u8 *)*(u64 *)(rsdp + 24);
    u32 xlen = *(u32 *)(xsdt + 4);
    u8 *dsdt = 0;
    for (u32 off = 36; off + 8 <= xlen; off += 8) {
        u8 *t = (u8 *)*(u64 *)(xsdt + off);
        if (!memcmp(t, "FACP", 4))
            dsdt = (u8 *)*(u64 *)(t + 140);             /* X_DSDT */
    }
    if (!dsdt)
        return 0;
    u32 dlen = *(u32 *)(dsdt + 4);
    int n = 0;
    for (u32 i = 36; i + 10 < dlen && n < max; i++) {
        if (dsdt[i] != 0x0d || memcmp(dsdt + i + 1, "LNRO0005", 9))
            continue;
        for (u32 j = i + 10; j + 12 < dlen; j++) {
            if (dsdt[j] == 0x86 && dsdt[j + 1] == 0x09 && dsdt[j + 2] == 0x00) {
                bases[n++] = *(u32 *)(dsdt + j + 4);   /* Memory32Fixed base */
                break;
            }
        }
    }
    return n;
}

int virtio_mmio_setup(u64 base, u64 want, struct vq *q, u16 size, u64 *features)
{
    if (r32(base) != 0x74726976 || r32(base + 4) != 2)
        return -1;
    u32 id = r32(base + 0x08);
    if (!id)
        return 0;                                       /* empty slot */
    w32(base + 0x70, 0);
    w32(base + 0x70, 1 | 2);
    w32(base + 0x14, 0);
    u64 f = r32(base + 0x10);
    w32(base + 0x14, 1);
    f |= (u64)r32(base + 0x10) << 32;
    f &= want | (1ul << VIRTIO_F_VERSION_1);
    *features = f;
    w32(base + 0x24, 0); w32(base + 0x20, (u32)f);
    w32(base + 0x24, 1); w32(base + 0x20, (u32)(f >> 32));
    w32(base + 0x70, 1 | 2 | 8);
    if (!(r32(base + 0x70) & 8))
        return -1;
    w32(base + 0x30, 0);
    u32 max = r32(base + 0x34);
    if (size > max) size = (u16)max;
    if (size > VQ_MAX) size = VQ_MAX;
    if (!max || ring_alloc(q, size))
        return -1;
    q->index = 0;
    q->mmio = 1;
    q->notify = base + 0x50;
    w32(base + 0x38, size);
    w32(base + 0x80, (u32)(u64)q->desc);  w32(base + 0x84, 0);
    w32(base + 0x90, (u32)(u64)q->avail); w32(base + 0x94, 0);
    w32(base + 0xa0, (u32)(u64)q->used);  w32(base + 0xa4, 0);
    w32(base + 0x44, 1);
    w32(base + 0x70, 1 | 2 | 8 | 4);
    return (int)id;
}

/* --- transport-neutral discovery and virtio-mmio bring-up ---------------------------- */
int virtio_find(struct vdev *v, u32 device_id)
{
    memset(v, 0, sizeof *v);
    if (arg_u64("mmio", 0)) {
        u64 bases[8];
        int n = acpi_virtio_mmio_slots(bases, 8);
        for (int i = 0; i < n; i++) {
            if (r32(bases[i]) == 0x74726976 && r32(bases[i] + 8) == device_id) {
                v->mmio = bases[i];
                v->device = bases[i] + 0x100;
                return 0;
            }
        }
        return -1;
    }
    u32 slot;
    if (virtio_pci_find((u16)(0x1040 + device_id), &slot))
        return -1;
    return virtio_pci_init(v, slot);
}

static int mmio_negotiate(struct vdev *v, u64 want)
{
    u64 base = v->mmio;
    w32(base + 0x70, 0);
    w32(base + 0x70, 1 | 2);
    w32(base + 0x14, 0);
    u64 f = r32(base + 0x10);
    w32(base + 0x14, 1);
    f |= (u64)r32(base + 0x10) << 32;
    v->features = f & (want | (1ul << VIRTIO_F_VERSION_1));
    w32(base + 0x24, 0); w32(base + 0x20, (u32)v->features);
    w32(base + 0x24, 1); w32(base + 0x20, (u32)(v->features >> 32));
    w32(base + 0x70, 1 | 2 | 8);
    return (r32(base + 0x70) & 8) ? 0 : -1;
}

static int mmio_queue_setup(struct vdev *v, struct vq *q, u16 index, u16 size)
{
    u64 base = v->mmio;
    w32(base + 0x30, index);
    u32 max = r32(base + 0x34);
    if (size > max) size = (u16)max;
    if (size > VQ_MAX) size = VQ_MAX;
    if (!max || ring_alloc(q, size))
        return -1;
    q->index = index;
    q->mmio = 1;
    q->notify = base + 0x50;
    w32(base + 0x38, size);
    w32(base + 0x80, (u32)(u64)q->desc);  w32(base + 0x84, 0);
    w32(base + 0x90, (u32)(u64)q->avail); w32(base + 0x94, 0);
    w32(base + 0xa0, (u32)(u64)q->used);  w32(base + 0xa4, 0);
    w32(base + 0x44, 1);
    return 0;
}

/* One virtio-blk request, polled: header, data (device-writable unless an OUT), status. */
struct blk_hdr { u32 type, reserved; u64 sector; };
static struct blk_hdr blk_hdr;
static u8 blk_status;

int virtio_blk_io(struct vq *q, u32 type, u64 sector, void *data, u32 len)
{
    blk_hdr.type = type;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    struct vbuf b[3] = { { &blk_hdr, 16, 0 }, { data, len, type != 1 }, { &blk_status, 1, 1 } };
    if (len) {
        vq_submit(q, b, 3);
    } else {
        b[1] = b[2];
        vq_submit(q, b, 2);
    }
    if (vq_wait(q, 4000000000ul) < 0)
        fail("no completion for request type %u", type);
    return blk_status;
}

/* virtio-blk: drive the first virtio-blk PCI device. Reads sector 0 and prints a
 * checksum of it (the host wrote a known pattern there), writes a pattern made from
 * seed= to sectors 8..15, flushes, reads it back and compares, asks for the device
 * ID, and checks that a read past the end fails with IOERR. With msix=1 (virtio-pci)
 * the queue interrupts by MSI-X vector 0 (guest vector 0x40): completions are still
 * polled, the interrupts are counted and must have arrived. */
#include "virtio.h"

#define VIRTIO_BLK_F_FLUSH 9
static u8 buf[8 * 512] __attribute__((aligned(512)));
static u8 out[8 * 512] __attribute__((aligned(512)));


/* MSI-X on: entry 0 -> LAPIC 0, vector 0x40, unmasked; the rest stay masked. */
static void msix_setup(u32 slot)
{
    int cap = pci_find_cap(0, slot, 0, 0x11);
    if (!cap)
        fail("no MSI-X capability");
    u32 t = pci_read32(0, slot, 0, cap + 4);
    u64 table = pci_bar_addr(0, slot, 0, t & 7) + (t & ~7u);
    irq_init();
    lapic_enable();
    mmio_write32(table + 0, (u32)LAPIC_BASE);
    mmio_write32(table + 4, 0);
    mmio_write32(table + 8, 0x40);
    mmio_write32(table + 12, 0);
    pci_write16(0, slot, 0, cap + 2, 0x8000);
}

int main(void)
{
    uart_init();
    u64 msix = arg_u64("msix", 0);
    struct vdev v;
    struct vq q;
    u32 slot;
    u64 devcfg;
    if (arg_u64("mmio", 0)) {
        u64 bases[8];
        int n = acpi_virtio_mmio_slots(bases, 8), found = -1;
        printf("acpi: %d virtio-mmio slots\n", n);
        for (int i = 0; i < n && found < 0; i++)
            if (virtio_mmio_setup(bases[i], 1ul << VIRTIO_BLK_F_FLUSH, &q, 64, &v.features) == 2)
                found = i;
        if (found < 0)
            fail("no virtio-blk in the ACPI virtio-mmio slots");
        devcfg = bases[found] + 0x100;
        printf("virtio-blk at mmio 0x%lx ", bases[found]);
    } else {
        if (virtio_pci_find(0x1042, &slot) || virtio_pci_init(&v, slot))
            fail("no virtio-blk");
        if (virtio_negotiate(&v, 1ul << VIRTIO_BLK_F_FLUSH))
            fail("FEATURES_OK refused");
        if (msix)
            msix_setup(slot);
        if (virtio_queue_setup(&v, &q, 0, 64, msix ? 0 : 0xffff))
            fail("queue setup");
        virtio_driver_ok(&v);
        devcfg = v.device;
        printf("virtio-blk at 00:%02x.0 ", slot);
    }
    u64 cap = *(volatile u32 *)devcfg | ((u64)*(volatile u32 *)(devcfg + 4) << 32);
    printf("capacity=%lu sectors features=%lx\n", cap, v.features);

    if (virtio_blk_io(&q, 0, 0, buf, 512)) fail("read sector 0");
    u32 sum = 0;
    for (int i = 0; i < 512; i++) sum = sum * 31 + buf[i];
    printf("sector0 sum=%x\n", sum);

    u32 seed = (u32)arg_u64("seed", 1);
    for (int i = 0; i < 8 * 512; i++) out[i] = (u8)((i * 131 + seed * 7) >> 2);
    if (virtio_blk_io(&q, 1, 8, out, sizeof out)) fail("write");
    if (virtio_blk_io(&q, 4, 0, 0, 0)) fail("flush");
    memset(buf, 0, sizeof buf);
    if (virtio_blk_io(&q, 0, 8, buf, sizeof buf)) fail("read back");
    if (memcmp(buf, out, sizeof out)) fail("read back differs");
    printf("ok write/flush/read-back\n");
    if (virtio_blk_io(&q, 8, 0, buf, 20)) fail("get id");
    printf("id=%s\n", (char *)buf);
    if (virtio_blk_io(&q, 0, cap, buf, 512) != 1) fail("read past the end did not fail");
    printf("ok read past the end -> IOERR\n");
    if (msix && !arg_u64("mmio", 0)) {
        if (!wait_irq(0x40, 1, 100000000ul))
            fail("no MSI-X interrupt for the queue");
        printf("msix irqs=%u\n", irq_count[0]);
    }
    if (!arg_u64("mmio", 0) && (virtio_status(&v) & 0x40)) fail("device needs reset");
    return 0;
}

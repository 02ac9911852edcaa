/* pci-testdev: drive pyvmm's PCI test device (1234:5050) through everything PCI:
 * BAR relocation, DMA (ok, bus mastering off, outside RAM), and interrupts by MSI,
 * MSI-X and INTx through the IOAPIC, each with masking: while masked nothing
 * arrives and the pending bit is set; on unmask it is delivered. Prints "ok <step>"
 * for each step; any failure exits with code 1. dev= the slot (default 1; a function
 * served through the vfio-user client sits in a later one). */
#include "pci.h"

static u32 DEV = 1;
#define R(off) (bar0 + (off))
#define SPIN 20000000ul

static u64 bar0;
static u8 src[4096] __attribute__((aligned(64)));
static u8 dst[4096] __attribute__((aligned(64)));

static void check(int cond, const char *what)
{
    if (!cond)
        fail("%s", what);
    printf("ok %s\n", what);
}

static int dma(u64 s, u64 d, u32 len, int irq)
{
    mmio_write32(R(0x28), 0xffffffff);             /* clear status */
    mmio_write32(R(0x40), (u32)s);
    mmio_write32(R(0x44), (u32)(s >> 32));
    mmio_write32(R(0x48), (u32)d);
    mmio_write32(R(0x4c), (u32)(d >> 32));
    mmio_write32(R(0x50), len);
    mmio_write32(R(0x58), 1 | (irq ? 4 : 0));
    return (int)mmio_read32(R(0x20));
}

int main(void)
{
    uart_init();
    irq_init();
    DEV = (u32)arg_u64("dev", 1);
    lapic_enable();
    check((pci_read32(0, DEV, 0, 0)) == 0x50501234, "testdev present");
    bar0 = pci_bar_addr(0, DEV, 0, 0);
    check(mmio_read32(R(0)) == 0x5050ED01, "BAR0 ID register");
    mmio_write32(R(4), 0x12345678);
    check(mmio_read32(R(4)) == ~0x12345678u, "scratch register liveness");

    /* Move BAR0: decoding off, new address, decoding on. */
    u16 cmd = pci_read16(0, DEV, 0, 4);
    pci_write16(0, DEV, 0, 4, cmd & ~2);
    u64 old = bar0;
    bar0 = 0xC0800000ul;
    pci_write32(0, DEV, 0, 0x10, (u32)bar0);
    pci_write16(0, DEV, 0, 4, cmd | 2 | 4);          /* memory + bus master */
    check(mmio_read32(R(0)) == 0x5050ED01, "BAR0 relocated");
    check(mmio_read32(old) == 0xffffffff, "old BAR0 address decodes nothing");

    /* DMA */
    for (int i = 0; i < 4096; i++)
        src[i] = (u8)(i * 7 + 3);
    u32 sum = 0;
    for (int i = 0; i < 4096; i++)
        sum += src[i];
    int st = dma((u64)src, (u64)dst, 4096, 0);
    check(st & 0x100 && !memcmp(src, dst, 4096), "DMA copy");
    check(mmio_read32(R(0x5c)) == sum, "DMA checksum");
    check(dma((u64)src, 0x4000000000ul, 64, 0) & 0x200, "DMA outside RAM fails cleanly");
    pci_write16(0, DEV, 0, 4, cmd | 2);              /* bus master off */
    check(dma((u64)src, (u64)dst, 64, 0) & 0x200, "DMA without bus mastering fails");
    pci_write16(0, DEV, 0, 4, cmd | 2 | 4);

    /* MSI: vector 0x40 */
    int msi = pci_find_cap(0, DEV, 0, 0x05);
    check(msi != 0, "MSI capability found");
    pci_write32(0, DEV, 0, msi + 4, 0xFEE00000);
    pci_write32(0, DEV, 0, msi + 8, 0);
    pci_write16(0, DEV, 0, msi + 12, 0x40);
    pci_write16(0, DEV, 0, msi + 2, pci_read16(0, DEV, 0, msi + 2) | 1);
    dma((u64)src, (u64)dst, 16, 1);
    check(wait_irq(0x40, 1, SPIN), "MSI on DMA completion");
    pci_write32(0, DEV, 0, msi + 16, 1);             /* mask vector 0 */
    mmio_write32(R(0x24), 1);
    check(!wait_irq(0x40, 2, SPIN / 20), "no MSI while masked");
    check(pci_read32(0, DEV, 0, msi + 20) & 1, "MSI pending bit set while masked");
    pci_write32(0, DEV, 0, msi + 16, 0);
    check(wait_irq(0x40, 2, SPIN), "pending MSI delivered on unmask");
    check(!(pci_read32(0, DEV, 0, msi + 20) & 1), "MSI pending bit cleared");
    pci_write16(0, DEV, 0, msi + 2, pci_read16(0, DEV, 0, msi + 2) & ~1);

    /* MSI-X: entry 0 -> vector 0x41, table in BAR1 */
    int msix = pci_find_cap(0, DEV, 0, 0x11);
    check(msix != 0, "MSI-X capability found");
    u32 tbl = pci_read32(0, DEV, 0, msix + 4);
    u64 table = pci_bar_addr(0, DEV, 0, tbl & 7) + (tbl & ~7u);
    u32 pbo = pci_read32(0, DEV, 0, msix + 8);
    u64 pba = pci_bar_addr(0, DEV, 0, pbo & 7) + (pbo & ~7u);
    check((pci_read16(0, DEV, 0, msix + 2) & 0x7ff) == 1, "MSI-X table size 2");
    mmio_write32(table + 0, 0xFEE00000);
    mmio_write32(table + 4, 0);
    mmio_write32(table + 8, 0x41);
    pci_write16(0, DEV, 0, msix + 2, 0x8000);        /* enable */
    mmio_write32(R(0x24), 1);
    check(!wait_irq(0x41, 1, SPIN / 20), "no MSI-X while the entry is masked (reset state)");
    check(mmio_read32(pba) & 1, "MSI-X PBA bit set");
    mmio_write32(table + 12, 0);                     /* unmask entry 0 */
    check(wait_irq(0x41, 1, SPIN), "pending MSI-X delivered on entry unmask");
    pci_write16(0, DEV, 0, msix + 2, 0x8000 | 0x4000); /* function mask */
    mmio_write32(R(0x24), 1);
    check(!wait_irq(0x41, 2, SPIN / 20), "no MSI-X under function mask");
    pci_write16(0, DEV, 0, msix + 2, 0x8000);
    check(wait_irq(0x41, 2, SPIN), "MSI-X delivered when function mask clears");
    dma((u64)src, (u64)dst, 16, 1);
    check(wait_irq(0x41, 3, SPIN), "MSI-X on DMA completion");
    mmio_write32(table + 8 + 0x10 * 5, 0x41);        /* entry 5: beyond the table */
    check(mmio_read32(table + 0x10 * 5) == 0xffffffff, "access beyond the MSI-X table ignored");
    pci_write16(0, DEV, 0, msix + 2, 0);

    /* INTx: pin A -> GSI from config, level-triggered through the IOAPIC, vector 0x42.
     * The handler acks the device before the LAPIC EOI. */
    u8 gsi = pci_read8(0, DEV, 0, 0x3c);
    irq_set_ack(0x42, R(0x28), 0xffffffff);
    /* level=1 is what PCI INTx is; on KVM-PVM a level-triggered IOAPIC interrupt
     * into a CPL3 trap gate triple-faults (see docs), so edge is the default. */
    ioapic_route(gsi, 0x42, (int)arg_u64("level", 0), 0);
    mmio_write32(R(0x24), 1);
    check(wait_irq(0x42, 1, SPIN), "INTx through the IOAPIC");
    check(!(pci_read16(0, DEV, 0, 6) & 0x08), "INTx status clear after ack");
    pci_write16(0, DEV, 0, 4, pci_read16(0, DEV, 0, 4) | 0x400);  /* INTx disable */
    mmio_write32(R(0x24), 1);
    check(!wait_irq(0x42, 2, SPIN / 20), "no INTx while disabled in PCI_COMMAND");
    check(pci_read16(0, DEV, 0, 6) & 0x08, "PCI_STATUS shows the pending INTx");
    pci_write16(0, DEV, 0, 4, pci_read16(0, DEV, 0, 4) & ~0x400);
    check(wait_irq(0x42, 2, SPIN), "INTx delivered when re-enabled");
    /* Garbage a buggy or hostile driver might write: the VMM must count it and go on. */
    u32 bar1 = pci_read32(0, DEV, 0, 0x14);
    pci_write32(0, DEV, 0, 0x14, (u32)bar0);        /* BAR1 onto the live BAR0: overlap */
    check(mmio_read32(R(0)) == 0x5050ED01, "overlapping BAR1 did not displace BAR0");
    pci_write32(0, DEV, 0, 0x14, bar1);
    pci_write32(0, DEV, 0, 0x10, 0xFEE00000);       /* BAR0 over the LAPIC: outside window */
    for (u32 off = 0x100; off < 0x1000; off += 4)   /* beyond the 256-byte config space */
        mmio_write32(PCI_ECAM_BASE + (DEV << 15) + off, 0xdeadbeef);
    check(mmio_read32(PCI_ECAM_BASE + (DEV << 15) + 0x100) == 0xffffffff,
          "config space beyond 256 bytes reads all-ones");
    pci_write32(0, DEV, 0, 0x10, (u32)bar0);        /* BAR0 back */
    check(mmio_read32(R(0)) == 0x5050ED01, "BAR0 still works after garbage");
    pci_write16(0, DEV, 0, msix + 2, 0x8000);
    mmio_write32(table + 0, 0x12345678);           /* MSI-X entry aimed at no LAPIC */
    mmio_write32(table + 12, 0);
    mmio_write32(R(0x24), 1);
    pci_write16(0, DEV, 0, msix + 2, 0);
    printf("pci-testdev: all passed (msi=%u msix=%u intx=%u)\n", irq_count[0], irq_count[1],
           irq_count[2]);
    return 0;
}

/* PCI config access by mechanism #1 (CF8/CFC through the int3 gate) or ECAM (CPL3
 * MMIO), BAR sizing, and CPL3 interrupt plumbing. Built with -mgeneral-regs-only:
 * irq_dispatch runs inside interrupt stubs that do not save SSE state. */
#include "pci.h"

int pci_mech = PCI_MECH_ECAM;

static u32 cf8(u32 bus, u32 dev, u32 fn, u32 reg)
{
    return 0x80000000u | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xfc);
}

static u64 ecam(u32 bus, u32 dev, u32 fn, u32 reg)
{
    return PCI_ECAM_BASE + ((u64)bus << 20) + (dev << 15) + (fn << 12) + reg;
}

u32 pci_read32(u32 bus, u32 dev, u32 fn, u32 reg)
{
    if (pci_mech == PCI_MECH_CF8) {
        outl(0xcf8, cf8(bus, dev, fn, reg));
        return inl(0xcfc);
    }
    return mmio_read32(ecam(bus, dev, fn, reg));
}

void pci_write32(u32 bus, u32 dev, u32 fn, u32 reg, u32 v)
{
    if (pci_mech == PCI_MECH_CF8) {
        outl(0xcf8, cf8(bus, dev, fn, reg));
        outl(0xcfc, v);
        return;
    }
    mmio_write32(ecam(bus, dev, fn, reg), v);
}

u16 pci_read16(u32 bus, u32 dev, u32 fn, u32 reg)
{
    if (pci_mech == PCI_MECH_CF8) {
        outl(0xcf8, cf8(bus, dev, fn, reg));
        return inw(0xcfc + (reg & 2));
    }
    return *(volatile u16 *)ecam(bus, dev, fn, reg);
}

void pci_write16(u32 bus, u32 dev, u32 fn, u32 reg, u16 v)
{
    if (pci_mech == PCI_MECH_CF8) {
        outl(0xcf8, cf8(bus, dev, fn, reg));
        outw(0xcfc + (reg & 2), v);
        return;
    }
    *(volatile u16 *)ecam(bus, dev, fn, reg) = v;
}

u8 pci_read8(u32 bus, u32 dev, u32 fn, u32 reg)
{
    if (pci_mech == PCI_MECH_CF8) {
        outl(0xcf8, cf8(bus, dev, fn, reg));
        return inb(0xcfc + (reg & 3));
    }
    return mmio_read8(ecam(bus, dev, fn, reg));
}

int pci_find_cap(u32 bus, u32 dev, u32 fn, u8 id)
{
    if (!(pci_read16(bus, dev, fn, 0x06) & 0x10))
        return 0;
    u8 p = pci_read8(bus, dev, fn, 0x34);
    for (int guard = 0; p && guard < 48; guard++) {
        if (pci_read8(bus, dev, fn, p) == id)
            return p;
        p = pci_read8(bus, dev, fn, p + 1);
    }
    return 0;
}

u64 pci_bar_addr(u32 bus, u32 dev, u32 fn, int i)
{
    u32 lo = pci_read32(bus, dev, fn, 0x10 + 4 * i);
    if (lo & 1)
        return lo & ~3u;
    u64 a = lo & ~0xfu;
    if ((lo & 6) == 4)
        a |= (u64)pci_read32(bus, dev, fn, 0x14 + 4 * i) << 32;
    return a;
}

u64 pci_bar_size(u32 bus, u32 dev, u32 fn, int i, int *is_io, int *is64)
{
    u32 reg = 0x10 + 4 * i;
    u32 orig = pci_read32(bus, dev, fn, reg);
    pci_write32(bus, dev, fn, reg, 0xffffffff);
    u32 lo = pci_read32(bus, dev, fn, reg);
    pci_write32(bus, dev, fn, reg, orig);
    *is_io = orig & 1;
    *is64 = !*is_io && (orig & 6) == 4;
    if (!lo)
        return 0;
    if (*is_io)
        return (~(lo & ~3u) + 1) & 0xffff;
    u64 mask = lo & ~0xfu;
    if (*is64) {
        u32 orig_hi = pci_read32(bus, dev, fn, reg + 4);
        pci_write32(bus, dev, fn, reg + 4, 0xffffffff);
        u32 hi = pci_read32(bus, dev, fn, reg + 4);
        pci_write32(bus, dev, fn, reg + 4, orig_hi);
        mask |= (u64)hi << 32;
    } else {
        mask |= 0xffffffff00000000ul;
    }
    return ~mask + 1;
}

volatile u32 irq_count[16];
static u64 ack_addr[16];
static u32 ack_val[16];
static u16 ack_sel_port[16], ack_data_port[16];
static u8 ack_sel[16];
static volatile u8 *ack_restore[16];

void irq_set_ack(u8 vector, u64 addr, u32 value)
{
    ack_addr[vector & 15] = addr;
    ack_val[vector & 15] = value;
}

void irq_set_ack_pio(u8 vector, u16 sel_port, u8 sel, u16 data_port, volatile u8 *restore)
{
    ack_sel_port[vector & 15] = sel_port;
    ack_sel[vector & 15] = sel;
    ack_data_port[vector & 15] = data_port;
    ack_restore[vector & 15] = restore;
}

/* CPL3 handlers sit behind trap gates (PVM needs them: an interrupt gate's IF=0 cannot
 * be undone by iretq at CPL3), so IF stays set inside a handler, and an interrupt
 * pending when the EOI lands nests on the handler's stack at once. A device that raises
 * its next interrupt as soon as the last is acknowledged (the RTC reinjecting owed
 * periods) would then nest one level per owed period, down through the stack: a triple
 * fault seen under load. So a handler entered while another runs only notes its vector
 * and returns WITHOUT an EOI (the LAPIC keeps that vector, and anything of lower
 * priority, in service, so no third can nest); the running one serves it after its own
 * EOI, in a loop. Depth stays at most 2. */
static volatile u32 irq_depth;
static volatile u32 irq_nested[16];

static void irq_serve(u32 i)
{
    irq_count[i]++;
    if (ack_addr[i])
        mmio_write32(ack_addr[i], ack_val[i]);
    if (ack_sel_port[i]) {  /* an indexed read acknowledges (the RTC's register C) */
        outb(ack_sel_port[i], ack_sel[i]);
        (void)inb(ack_data_port[i]);
        /* The interrupted code may be between selecting an index and using it: put
         * back the index it published, so its access reaches the register it chose. */
        if (ack_restore[i])
            outb(ack_sel_port[i], *ack_restore[i]);
    }
    mmio_write32(LAPIC_BASE + 0xb0, 0);  /* EOI: of the highest vector in service */
}

void irq_dispatch(u64 vector)
{
    u32 i = vector & 15;
    if (irq_depth) {
        irq_nested[i]++;
        return;
    }
    for (;;) {
        irq_depth = 1;
        irq_serve(i);
        for (;;) {  /* what nested meanwhile, each still in service at the LAPIC */
            u32 j = 0;
            while (j < 16 && !irq_nested[j])
                j++;
            if (j == 16)
                break;
            irq_nested[j]--;
            irq_serve(j);
        }
        irq_depth = 0;
        /* One may have noted itself between the last look and depth = 0. */
        u32 j = 0;
        while (j < 16 && !irq_nested[j])
            j++;
        if (j == 16)
            return;
        irq_nested[j]--;
        i = j;
    }
}

extern char irq_stubs[];

void irq_init(void)
{
    for (int v = 0; v < 16; v++)
        idt_set_user_handler((u8)(0x40 + v), (void (*)(void))(irq_stubs + 32 * v));
}

void lapic_enable(void)
{
    mmio_write32(LAPIC_BASE + 0xf0, 0x1ff);  /* SVR: software enable, spurious 0xff */
    mmio_write32(LAPIC_BASE + 0x80, 0);      /* TPR: accept all priorities */
}

void ioapic_route(u32 pin, u8 vector, int level, int masked)
{
    u32 lo = vector | (level ? 1u << 15 : 0) | (masked ? 1u << 16 : 0);
    mmio_write32(IOAPIC_BASE, 0x11 + 2 * pin);
    mmio_write32(IOAPIC_BASE + 0x10, 0);     /* destination APIC 0 */
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);
    mmio_write32(IOAPIC_BASE + 0x10, lo);
}

int wait_irq(u8 vector, u32 want, u64 spins)
{
    while (spins--) {
        if (irq_count[vector & 15] >= want)
            return 1;
        cpu_relax();
    }
    return irq_count[vector & 15] >= want;
}

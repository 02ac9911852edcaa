/* Guest-side PCI access and CPL3 interrupt helpers. */
#ifndef PYVMM_PCI_H
#define PYVMM_PCI_H
#include "guest.h"

#define PCI_ECAM_BASE 0xB0000000UL
#define LAPIC_BASE    0xFEE00000UL
#define IOAPIC_BASE   0xFEC00000UL

enum pci_mech { PCI_MECH_CF8 = 1, PCI_MECH_ECAM = 2 };
extern int pci_mech;

u32 pci_read32(u32 bus, u32 dev, u32 fn, u32 reg);
void pci_write32(u32 bus, u32 dev, u32 fn, u32 reg, u32 v);
u16 pci_read16(u32 bus, u32 dev, u32 fn, u32 reg);
void pci_write16(u32 bus, u32 dev, u32 fn, u32 reg, u16 v);
u8 pci_read8(u32 bus, u32 dev, u32 fn, u32 reg);
int pci_find_cap(u32 bus, u32 dev, u32 fn, u8 id);
/* Size BAR i (decoding must be off); returns size and sets *is_io / *is64. */
u64 pci_bar_size(u32 bus, u32 dev, u32 fn, int i, int *is_io, int *is64);
u64 pci_bar_addr(u32 bus, u32 dev, u32 fn, int i);

/* Interrupts: vectors 0x40-0x4f go to CPL3 stubs that count, write the registered
 * ack (an MMIO store, for level-triggered sources) and EOI the LAPIC. */
extern volatile u32 irq_count[16];
void irq_init(void);
void irq_set_ack(u8 vector, u64 addr, u32 value);
/* Acknowledge by an indexed port read: outb(sel_port, sel); inb(data_port); then
 * outb(sel_port, *restore) if restore: the index the interrupted code published. */
void irq_set_ack_pio(u8 vector, u16 sel_port, u8 sel, u16 data_port, volatile u8 *restore);
void lapic_enable(void);
void ioapic_route(u32 pin, u8 vector, int level, int masked);
int wait_irq(u8 vector, u32 want, u64 spins);
#endif

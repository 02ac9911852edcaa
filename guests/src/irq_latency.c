/* irq-latency: n= times, raise an interrupt through a device register and time, with
 * the guest TSC, from just before the register write to the CPL3 handler having run.
 *   mode=1  MSI from the PCI test device (RAISE register), vector 0x40
 *   mode=2  the test device's INTx through the IOAPIC (edge), vector 0x42
 *   mode=3  the UART's THRE interrupt (IRQ 4) through the 8259 (auto-EOI), vector 0x44
 * Prints the sorted samples' median, p90 and p99 in TSC cycles. */
#include "pci.h"

#define DEV 1
static u32 samples[20000];

static void sort(u32 *a, u32 n)
{
    for (u32 gap = n / 2; gap; gap /= 2)       /* shell sort: no libc here */
        for (u32 i = gap; i < n; i++)
            for (u32 j = i; j >= gap && a[j - gap] > a[j]; j -= gap) {
                u32 t = a[j]; a[j] = a[j - gap]; a[j - gap] = t;
            }
}

int main(void)
{
    uart_init();
    u32 n = (u32)arg_u64("n", 2000), mode = (u32)arg_u64("mode", 1);
    if (n > 20000) n = 20000;
    irq_init();
    lapic_enable();
    u64 bar0 = pci_bar_addr(0, DEV, 0, 0);
    pci_write16(0, DEV, 0, 4, pci_read16(0, DEV, 0, 4) | 6);
    u8 vec;
    if (mode == 1) {
        int msi = pci_find_cap(0, DEV, 0, 0x05);
        pci_write32(0, DEV, 0, msi + 4, 0xFEE00000);
        pci_write16(0, DEV, 0, msi + 12, 0x40);
        pci_write16(0, DEV, 0, msi + 2, pci_read16(0, DEV, 0, msi + 2) | 1);
        vec = 0x40;
    } else if (mode == 2) {
        irq_set_ack(0x42, bar0 + 0x28, 0xffffffff);
        ioapic_route(pci_read8(0, DEV, 0, 0x3c), 0x42, 0, 0);
        vec = 0x42;
    } else {
        outb(0x20, 0x11); outb(0x21, 0x40); outb(0x21, 0x04); outb(0x21, 0x03);
        outb(0x21, 0xef);                      /* only IRQ 4 */
        outb(COM1_BASE + 4, 0x0b);             /* MCR: DTR RTS OUT2 */
        vec = 0x44;
    }
    for (u32 i = 0; i < n; i++) {
        u32 before = irq_count[vec & 15];
        u64 t0 = rdtsc();
        if (mode == 3) {
            outb(COM1_BASE + 1, 0x00);         /* IER off: line low */
            outb(COM1_BASE + 1, 0x02);         /* THRI on with THR empty: raise */
        } else {
            mmio_write32(bar0 + 0x24, 1);      /* RAISE */
        }
        while (irq_count[vec & 15] == before)
            cpu_relax();
        samples[i] = (u32)(rdtsc() - t0);
        if (mode == 1)
            mmio_write32(bar0 + 0x28, 0xffffffff);
    }
    if (mode == 3)
        outb(COM1_BASE + 1, 0x00);
    sort(samples, n);
    printf("irq-latency mode=%u n=%u p50=%u p90=%u p99=%u\n", mode, n, samples[n / 2],
           samples[n * 9 / 10], samples[n * 99 / 100]);
    return 0;
}

/* rtc: read the MC146818's date and time (BCD, after UIP clears) and print them; then
 * enable the periodic interrupt at 1024 Hz (rate 6) routed through the IOAPIC (pin 8,
 * edge, vector 0x43), acknowledged by reading register C in the handler, and count it
 * for ms= of guest time at tsc_khz=; then the total since enabling it. */
#include "pci.h"

/* The index main last selected: the interrupt handler reads register C to
 * acknowledge and then selects this again (the index port cannot be read back). */
static volatile u8 cmos_index;

static u8 cmos(u8 reg)
{
    cmos_index = reg;
    outb(0x70, reg);
    return inb(0x71);
}

static void cmos_write(u8 reg, u8 v)
{
    cmos_index = reg;
    outb(0x70, reg);
    outb(0x71, v);
}

static u32 bcd(u8 v) { return (v >> 4) * 10 + (v & 15); }

int main(void)
{
    uart_init();
    u64 ms = arg_u64("ms", 500), khz = arg_u64("tsc_khz", 0);
    u64 rate = arg_u64("rate", 6);                  /* periodic rate: 32768 >> (rate-1) Hz */
    if (rate < 3 || rate > 15) fail("rate must be 3..15");
    u64 hz = 32768 >> (rate - 1);
    while (cmos(0x0a) & 0x80)
        cpu_relax();
    u32 s = bcd(cmos(0)), m = bcd(cmos(2)), h = bcd(cmos(4));
    u32 d = bcd(cmos(7)), mo = bcd(cmos(8)), y = bcd(cmos(9)), c = bcd(cmos(0x32));
    printf("rtc %02u%02u-%02u-%02u %02u:%02u:%02u\n", c, y, mo, d, h, m, s);
    printf("cmos mem above 1M: %u KiB\n", cmos(0x30) | (cmos(0x31) << 8));
    if (!khz)
        return 0;
    irq_init();
    lapic_enable();
    ioapic_route(8, 0x43, 0, 0);
    irq_set_ack_pio(0x43, 0x70, 0x0c, 0x71, &cmos_index); /* the handler reads C */
    cmos_write(0x0a, (u8)(0x20 | rate));                  /* 32.768 kHz base, rate */
    cmos_write(0x0b, cmos(0x0b) | 0x40);                  /* PIE */
    if (!wait_irq(0x43, 1, 2000000000ul))
        fail("no RTC interrupt");
    u32 start = irq_count[3];
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < ms * khz)
        cpu_relax();
    u32 n = irq_count[3] - start;
    cmos_write(0x0b, cmos(0x0b) & ~0x40);
    (void)cmos(0x0c);                             /* acknowledge what may be pending */
    for (u64 t1 = rdtsc(); rdtsc() - t1 < 10 * khz;)  /* 10 ms for one in flight to land */
        cpu_relax();
    printf("rtc periodic ticks=%u expected=%lu total=%u\n", n, hz * ms / 1000, irq_count[3]);
    return 0;
}

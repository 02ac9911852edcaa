/* rtc: read the MC146818's date and time (BCD, after UIP clears) and print them; then
 * enable the periodic interrupt at 1024 Hz (rate 6) routed through the IOAPIC (pin 8,
 * edge, vector 0x43) and count it for ms= of guest time at tsc_khz=. */
#include "pci.h"

static u8 cmos(u8 reg)
{
    outb(0x70, reg);
    return inb(0x71);
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
    outb(0x70, 0x0a); outb(0x71, (u8)(0x20 | rate)); /* 32.768 kHz base, chosen rate */
    outb(0x70, 0x0b); outb(0x71, cmos(0x0b) | 0x40); /* PIE */
    if (!wait_irq(0x43, 1, 2000000000ul))
        fail("no RTC interrupt");
    u32 start = irq_count[3];
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < ms * khz)
        cpu_relax();
    u32 n = irq_count[3] - start;
    outb(0x70, 0x0b); outb(0x71, cmos(0x0b) & ~0x40);
    printf("rtc periodic ticks=%u expected=%lu\n", n, hz * ms / 1000);
    return 0;
}

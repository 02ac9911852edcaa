/* ps2: bring up the i8042 and its keyboard and mouse the way Linux's i8042.c, atkbd.c
 * and psmouse do, checking every reply; then echo what arrives over the UART, one line
 * per byte ("ps2 kbd 1e" / "ps2 aux 08"), until bytes= of them have come.
 *   xlate=1  keep the controller's set 2 -> set 1 translation on (as Linux does)
 *   irq=0    poll the status register for OBF; irq=1: IRQ 1 and IRQ 12 through the
 *            IOAPIC (pins 1 and 12, edge, vectors 0x44/0x45): the handler counts, and
 *            the main loop reads one byte per interrupt counted, which must be there.
 *            (The handler does not read the byte itself: on this host a CPL3 trap-gate
 *            handler can be re-entered at its port accesses, which would store bytes
 *            out of order.)
 *            irq=2: the same through the 8259 pair (auto-EOI; IRQ 1 on the master at
 *            vector 0x41, IRQ 12 on the slave at 0x4c, through the cascade on IRQ 2)
 *   flood=1  after the keyboard init: 1000 echo commands without reading, 100 self
 *            tests likewise, reads of the empty buffer, an unknown keyboard command;
 *            prints what came back, then goes on
 * Exits 0 after the last byte, 1 (with a FAIL line) at the first wrong reply. */
#include "pci.h"

#define DATA 0x60
#define STATUS 0x64
#define OBF 0x01
#define IBF 0x02
#define AUXB 0x20
#define SPINS 200000u

static int get_within(u8 *st, u32 spins)
{
    for (u32 i = 0; i < spins; i++) {
        u8 s = inb(STATUS);
        if (s & OBF) {
            if (st)
                *st = s;
            return inb(DATA);
        }
        cpu_relax();
    }
    return -1;
}

static int get(u8 *st) { return get_within(st, SPINS); }

static void wait_ibf(void)
{
    for (u32 i = 0; i < SPINS && (inb(STATUS) & IBF); i++)
        cpu_relax();
}

static void cmd(u8 c) { wait_ibf(); outb(STATUS, c); }
static void data(u8 d) { wait_ibf(); outb(DATA, d); }
static void aux(u8 d) { cmd(0xd4); data(d); }

/* Read n bytes and compare them with want; want_aux: every one must carry AUXB. */
static void expect(const char *what, const u8 *want, int n, int want_aux)
{
    for (int i = 0; i < n; i++) {
        u8 st = 0;
        int b = get(&st);
        if (b != want[i])
            fail("%s: byte %d is %x, want %x", what, i, b, want[i]);
        if (!!(st & AUXB) != want_aux)
            fail("%s: byte %d status %x (aux data %s)", what, i, st, want_aux ? "expected" : "unexpected");
    }
    int extra = get_within(0, 64);  /* each poll is a trapped port read: a short look */
    if (extra >= 0)
        fail("%s: unexpected byte %x after the reply", what, extra);
    printf("ps2 %s ok\n", what);
}

#define EXPECT(what, want_aux, ...) do { static const u8 w_[] = {__VA_ARGS__}; \
    expect(what, w_, (int)sizeof w_, want_aux); } while (0)

int main(void)
{
    uart_init();
    u64 xlate = arg_u64("xlate", 1), use_irq = arg_u64("irq", 0), want = arg_u64("bytes", 0);

    /* i8042.c: flush, read the command byte, self test, interface tests */
    for (int i = 0; i < 64 && (inb(STATUS) & OBF); i++)
        (void)inb(DATA);
    cmd(0x20);
    int ctr = get(0);
    if (ctr < 0)
        fail("no command byte");
    printf("ps2 ctr %x\n", ctr);
    cmd(0xaa);
    EXPECT("selftest", 0, 0x55);
    cmd(0xab);
    EXPECT("kbd-port-test", 0, 0x00);
    /* i8042_check_aux: aux port off in the command byte, 0xA8 turns it on */
    cmd(0x60); data((u8)((ctr | 0x20) & ~0x03));
    cmd(0xa8);
    cmd(0x20);
    int c2 = get(0);
    if (c2 < 0 || (c2 & 0x20))
        fail("0xA8 did not enable the aux port (ctr %x)", c2);
    cmd(0xa9);
    EXPECT("aux-port-test", 0, 0x00);
    cmd(0xd3); data(0x5a);                 /* aux loopback: comes back as mouse data */
    EXPECT("aux-loopback", 1, 0x5a);
    /* polled from here; both ports on, interrupts off, translation as asked */
    u8 base_ctr = (u8)((ctr & ~0x73) | 0x04 | (xlate ? 0x40 : 0));
    cmd(0x60); data(base_ctr);

    /* atkbd: reset, identify, scan code set 2, LEDs, typematic, echo, enable */
    data(0xff);
    EXPECT("kbd-reset", 0, 0xfa, 0xaa);
    data(0xf2);
    if (xlate)
        EXPECT("kbd-id", 0, 0xfa, 0xab, 0x41);   /* 0x83 through the translation */
    else
        EXPECT("kbd-id", 0, 0xfa, 0xab, 0x83);
    /* a command with an argument: each byte is acknowledged before the next goes
     * (libps2's ps2_command waits for the ACK the same way) */
    data(0xf0); EXPECT("kbd-set-cmd", 0, 0xfa);
    data(0x02); EXPECT("kbd-set2", 0, 0xfa);
    data(0xed); EXPECT("kbd-leds-cmd", 0, 0xfa);
    data(0x00); EXPECT("kbd-leds", 0, 0xfa);
    data(0xf3); EXPECT("kbd-typematic-cmd", 0, 0xfa);
    data(0x00); EXPECT("kbd-typematic", 0, 0xfa);
    data(0xee);
    EXPECT("kbd-echo", 0, 0xee);
    data(0xf4);
    EXPECT("kbd-enable", 0, 0xfa);

    if (arg_u64("flood", 0)) {
        for (int i = 0; i < 1000; i++)
            data(0xee);
        u32 echoes = 0, other = 0;
        for (int b; (b = get_within(0, 64)) >= 0;)
            b == 0xee ? echoes++ : other++;
        printf("ps2 flood echoes=%u other=%u\n", echoes, other);
        for (int i = 0; i < 100; i++)
            cmd(0xaa);
        u32 passes = 0;
        for (int b; (b = get_within(0, 64)) >= 0;)
            passes += b == 0x55;
        printf("ps2 flood selftests=%u\n", passes);
        u8 st = inb(STATUS);
        u8 a = inb(DATA), b = inb(DATA);    /* the output buffer is empty */
        printf("ps2 empty-read status=%x %x %x\n", st & OBF, a, b);
        data(0x42);                         /* no such keyboard command */
        EXPECT("kbd-unknown", 0, 0xfe);
    }

    /* psmouse: reset, ID, the IntelliMouse knock, resolution, scaling, rate, enable */
    aux(0xff);
    EXPECT("mouse-reset", 1, 0xfa, 0xaa, 0x00);
    aux(0xf2);
    EXPECT("mouse-id", 1, 0xfa, 0x00);
    static const u8 knock[] = {0xf3, 200, 0xf3, 100, 0xf3, 80};
    for (unsigned i = 0; i < sizeof knock; i++) {
        aux(knock[i]);
        EXPECT("mouse-knock", 1, 0xfa);
    }
    aux(0xf2);
    EXPECT("mouse-id-imps", 1, 0xfa, 0x03);
    aux(0xe8); EXPECT("mouse-resolution-cmd", 1, 0xfa);
    aux(0x03); EXPECT("mouse-resolution", 1, 0xfa);
    aux(0xe6);
    EXPECT("mouse-scaling", 1, 0xfa);
    aux(0xf3); EXPECT("mouse-rate-cmd", 1, 0xfa);
    aux(100); EXPECT("mouse-rate", 1, 0xfa);
    aux(0xe9);
    EXPECT("mouse-status", 1, 0xfa, 0x00, 0x03, 100);
    aux(0xf4);
    EXPECT("mouse-enable", 1, 0xfa);
    puts("ps2 init ok\n");

    u32 kv = 4, av = 5;                            /* irq_count slots: vector & 15 */
    if (use_irq == 1) {
        irq_init();
        lapic_enable();
        ioapic_route(1, 0x44, 0, 0);
        ioapic_route(12, 0x45, 0, 0);
    } else if (use_irq == 2) {
        irq_init();
        lapic_enable();
        outb(0x20, 0x11); outb(0x21, 0x40); outb(0x21, 0x04); outb(0x21, 0x03);
        outb(0xa0, 0x11); outb(0xa1, 0x48); outb(0xa1, 0x02); outb(0xa1, 0x03);
        outb(0xa1, (u8)~0x10);                     /* slave: IRQ 12 only */
        outb(0x21, (u8)~0x06);                     /* master: IRQ 1 and the cascade */
        kv = 1, av = 12;
    }
    if (use_irq) {
        cmd(0x60); data((u8)(base_ctr | 0x03));   /* INT and INT2 */
    }
    puts("ps2 ready\n");
    for (u64 n = 0; n < want; n++) {
        u16 v;
        if (use_irq) {
            /* one interrupt per byte: wait for the n+1st, then the byte must be there */
            while (irq_count[kv] + irq_count[av] <= n)
                cpu_relax();
            u8 st = inb(STATUS);
            if (!(st & OBF))
                fail("interrupt %lu without a byte (status %x)", n + 1, st);
            v = (u16)(st << 8 | inb(DATA));
        } else {
            u8 st;
            int b;
            while ((b = get(&st)) < 0)
                ;
            v = (u16)(st << 8 | b);
        }
        printf("ps2 %s %02x\n", (v >> 8) & AUXB ? "aux" : "kbd", v & 0xff);
    }
    printf("ps2 done irqs=%u/%u\n", irq_count[kv], irq_count[av]);
    return 0;
}

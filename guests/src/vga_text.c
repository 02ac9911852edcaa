/* vga-text: a text-mode driver as a PC kernel's early console is. Checks the VGA
 * registers a BIOS leaves in mode 3, writes an 80x25 screen into the 0xB8000 buffer
 * (guest memory in a dirty-logged memslot: no exit per store), moves the cursor and
 * sets its shape through the CRTC, pokes the attribute controller's flip-flop and the
 * retrace bit, writes garbage indices, and prints what it wrote so that the host can
 * compare the buffer and its PNG with it. rounds=N rewrites the screen N times more
 * (to show that the stores cost no exits); hold=1 spins after reporting, for QEMU's
 * screendump in tests/e2e. */
#include "guest.h"

#define VGA_TEXT 0xB8000UL
#define COLS 80
#define ROWS 25

static void crtc(u8 i, u8 v) { outb(0x3D4, i); outb(0x3D5, v); }
static u8 crtc_rd(u8 i) { outb(0x3D4, i); return inb(0x3D5); }

static void check(int cond, const char *what)
{
    if (!cond)
        fail("%s", what);
    printf("ok %s\n", what);
}

static void put(volatile u16 *buf, int row, int col, const char *s, u8 attr)
{
    for (; *s && col < COLS; s++, col++)
        buf[row * COLS + col] = (u16)(u8)*s | (u16)attr << 8;
}

int main(void)
{
    uart_init();
    u64 rounds = arg_u64("rounds", 0);
    volatile u16 *buf = (volatile u16 *)VGA_TEXT;

    check((inb(0x3CC) & 1) == 1, "misc output: colour I/O decode (0x3Dx)");
    check(crtc_rd(0x01) == 79, "CRTC horizontal display end: 80 columns");
    check(crtc_rd(0x09) == 0x4F, "CRTC max scan line: 16-line cells");
    /* Input status 1: the retrace bit changes between reads, and a read resets the
     * attribute flip-flop (the next 0x3C0 write is an index). */
    u8 s1 = inb(0x3DA), s2 = inb(0x3DA);
    check(((s1 ^ s2) & 0x08) != 0, "input status 1: retrace bit toggles");
    inb(0x3DA);
    outb(0x3C0, 0x10 | 0x20);   /* index: mode control, palette source on */
    u8 mode = inb(0x3C1);
    outb(0x3C0, mode);           /* data: written back unchanged */
    check(inb(0x3C0) == 0x30, "attribute index reads back with PAS");
    check(mode == 0x0C, "attribute mode control as mode 3 sets it (0x0C)");
    outb(0x3CE, 0x06);
    check((inb(0x3CF) & 0x0D) == 0x0C, "graphics misc: text, map at 0xB8000");
    outb(0x3C4, 0x04);
    check(inb(0x3C5) == 0x02, "sequencer memory mode: odd/even");

    /* Garbage the VMM must shrug off (logged once): indices past the register files. */
    crtc(0x7F, 0xAA);
    outb(0x3CE, 0x0F); outb(0x3CF, 0x55);
    outb(0x3C4, 0x07); outb(0x3C5, 0x55);
    /* pyvmm: 0xff (no register); QEMU keeps a 256-byte CRTC file and reads back. */
    u8 past = crtc_rd(0x7F);
    check(past == 0xFF || past == 0xAA, "CRTC index past 0x18: no effect on the screen");
    printf("vga-text: CRTC 0x7f reads %02x\n", past);

    for (u64 r = 0; r <= rounds; r++) {
        for (int i = 0; i < COLS * ROWS; i++)
            buf[i] = (u16)(' ' | 0x07 << 8);
        put(buf, 0, 0, "pyvmm VGA text mode: 0xB8000 in a dirty-logged memslot", 0x1F);
        for (int row = 2; row < ROWS - 2; row++) {
            char line[COLS + 1];
            snprintf(line, sizeof line, "row %2d: fg %x bg %x  \xb0\xb1\xdb \xc9\xcd\xbb",
                     row, row & 15, (row >> 2) & 7);
            put(buf, row, 2, line, (u8)((row & 15) | ((row >> 2) & 7) << 4));
        }
        for (int c = 0; c < 256; c++)  /* the whole character set, 32 a row */
            buf[(2 + c / 32) * COLS + 44 + c % 32] = (u16)(c | 0x70 << 8);
        put(buf, ROWS - 1, 0, "the end", 0x4E);
    }
    /* Cursor after "the end", shape: scan lines 13-15 (an underline). */
    u16 pos = (ROWS - 1) * COLS + 7;
    crtc(0x0E, pos >> 8);
    crtc(0x0F, pos & 0xFF);
    crtc(0x0A, 13);
    crtc(0x0B, 15);
    check(crtc_rd(0x0E) == pos >> 8 && crtc_rd(0x0F) == (pos & 0xFF), "cursor location");
    /* CR11 bit 7 protects CR00-CR07: a write to CR01 is dropped. */
    crtc(0x11, crtc_rd(0x11) | 0x80);
    crtc(0x01, 0x27);
    check(crtc_rd(0x01) == 79, "CR00-CR07 write-protected by CR11 bit 7");
    printf("vga-text: cursor %u shape 13-15 rounds %lu\n", pos, rounds + 1);
    printf("vga-text: all passed\n");
    if (arg_u64("hold", 0))  /* keep the screen for a host that takes a screendump */
        for (;;)
            cpu_relax();
    return 0;
}

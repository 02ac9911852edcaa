/* CPL3 C runtime: boot-info parsing, console, printf, exit. */
#include "guest.h"

extern u64 boot_info;
extern u32 boot_magic;
extern u8 idt[];
extern char _end[];

#define MULTIBOOT_MAGIC      0x2BADB002u
#define MULTIBOOT_INFO_CMDLINE 0x4u
#define XEN_HVM_START_MAGIC  0x336ec578u

static const char *g_cmdline = "";

const char *cmdline(void) { return g_cmdline; }

static void parse_boot_info(void)
{
    if (boot_magic == MULTIBOOT_MAGIC && boot_info) {
        const u32 *mbi = (const u32 *)boot_info;
        if (mbi[0] & MULTIBOOT_INFO_CMDLINE && mbi[4])
            g_cmdline = (const char *)(u64)mbi[4];
    } else if (boot_info && *(const u32 *)boot_info == XEN_HVM_START_MAGIC) {
        /* struct hvm_start_info: cmdline_paddr at offset 24 */
        u64 p = *(const u64 *)(boot_info + 24);
        if (p)
            g_cmdline = (const char *)p;
    }
}

u64 arg_u64(const char *key, u64 dflt)
{
    size_t kl = strlen(key);
    const char *p = g_cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, kl) && p[kl] == '=') {
            p += kl + 1;
            u64 v = 0, base = 10;
            if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
                base = 16;
                p += 2;
            }
            for (;; p++) {
                u64 d;
                if (*p >= '0' && *p <= '9') d = *p - '0';
                else if (base == 16 && *p >= 'a' && *p <= 'f') d = *p - 'a' + 10;
                else if (base == 16 && *p >= 'A' && *p <= 'F') d = *p - 'A' + 10;
                else break;
                v = v * base + d;
            }
            return v;
        }
        while (*p && *p != ' ')
            p++;
    }
    return dflt;
}

void idt_set_user_handler(u8 vector, void (*handler)(void))
{
    u8 *g = idt + 16 * vector;
    u64 h = (u64)handler;
    *(u16 *)(g + 0) = (u16)h;
    *(u16 *)(g + 2) = 0x23;          /* user code selector: the handler runs at CPL3 */
    *(u16 *)(g + 4) = 0xEF00;        /* present, DPL3, 64-bit trap gate */
    *(u16 *)(g + 6) = (u16)(h >> 16);
    *(u32 *)(g + 8) = (u32)(h >> 32);
    *(u32 *)(g + 12) = 0;
}

void exit(u32 code)
{
    if (code == 0)
        outb(I8042_CMD_PORT, 0xFE);   /* pulse reset: pyvmm ends the VM cleanly */
    outl(DEBUG_EXIT_PORT, code);
    for (;;)
        cpu_relax();
}

void fail(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    puts("FAIL: ");
    puts(buf);
    putc('\n');
    exit(1);
}

void rt_main(void)
{
    parse_boot_info();
    exit((u32)main());
}

/* --- string.h --- */
void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--) *dp++ = *sp++;
    return d;
}
void *memset(void *d, int c, size_t n)
{
    u8 *dp = d;
    while (n--) *dp++ = (u8)c;
    return d;
}
int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y) return *x - *y;
    return 0;
}
size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n]) n++;
    return n;
}
int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b) return (u8)*a - (u8)*b;
        if (!*a) return 0;
    }
    return 0;
}

/* --- console --- */
#define UART_THR 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_LSR_THRE 0x20

void uart_init(void)
{
    outb(COM1_BASE + UART_IER, 0x00);
    outb(COM1_BASE + UART_LCR, 0x80);   /* DLAB: 115200 baud */
    outb(COM1_BASE + 0, 0x01);
    outb(COM1_BASE + 1, 0x00);
    outb(COM1_BASE + UART_LCR, 0x03);   /* 8N1 */
    outb(COM1_BASE + UART_FCR, 0x07);   /* FIFO on, cleared */
    outb(COM1_BASE + UART_MCR, 0x03);   /* DTR, RTS */
}

void putc(char c)
{
    while (!(inb(COM1_BASE + UART_LSR) & UART_LSR_THRE))
        cpu_relax();
    outb(COM1_BASE + UART_THR, (u8)c);
}

void puts(const char *s)
{
    while (*s) putc(*s++);
}

int printf(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    puts(buf);
    return n;
}

int snprintf(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    return r;
}

struct out { char *buf; size_t n, len; };

static void emit(struct out *o, char c)
{
    if (o->len + 1 < o->n) o->buf[o->len] = c;
    o->len++;
}

static void emit_num(struct out *o, u64 v, unsigned base, int neg, int width, char pad)
{
    char tmp[24];
    int i = 0;
    do {
        unsigned d = v % base;
        tmp[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (neg) tmp[i++] = '-';
    while (i < width) { emit(o, pad); width--; }
    while (i) emit(o, tmp[--i]);
}

int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
    struct out o = { buf, n, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') { emit(&o, *fmt); continue; }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') { lng = 1; fmt++; }
        switch (*fmt) {
        case 'd': {
            i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
            emit_num(&o, v < 0 ? (u64)-v : (u64)v, 10, v < 0, width, pad);
            break;
        }
        case 'u': emit_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, 0, width, pad); break;
        case 'x': emit_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, 0, width, pad); break;
        case 'p': emit(&o, '0'); emit(&o, 'x'); emit_num(&o, (u64)va_arg(ap, void *), 16, 0, 0, ' '); break;
        case 'c': emit(&o, (char)va_arg(ap, int)); break;
        case 's': { const char *s = va_arg(ap, const char *); while (*s) emit(&o, *s++); break; }
        case '%': emit(&o, '%'); break;
        default: emit(&o, '%'); emit(&o, *fmt); break;
        }
    }
    if (n) buf[o.len < n ? o.len : n - 1] = 0;
    return (int)o.len;
}

/* pyvmm tiny-guest library: everything here runs at CPL3. */
#ifndef PYVMM_GUEST_H
#define PYVMM_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_end __builtin_va_end
#define va_arg __builtin_va_arg

/* Machine constants shared with pyvmm's machine map (src/pyvmm/machine/layout.py). */
#define COM1_BASE       0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define I8042_CMD_PORT  0x64
#define TESTDEV_MMIO    0xfef00000UL

/* Port I/O through the int3 gate (CPL3 in/out fault on KVM-PVM). */
enum { PIO_OUTB, PIO_OUTW, PIO_OUTL, PIO_INB, PIO_INW, PIO_INL };

static inline u32 pio(u32 op, u32 port, u32 val)
{
    __asm__ volatile("int3" : "+a"(val) : "D"(op), "d"(port) : "memory");
    return val;
}
static inline void outb(u16 port, u8 v) { pio(PIO_OUTB, port, v); }
static inline void outw(u16 port, u16 v) { pio(PIO_OUTW, port, v); }
static inline void outl(u16 port, u32 v) { pio(PIO_OUTL, port, v); }
static inline u8 inb(u16 port) { return (u8)pio(PIO_INB, port, 0); }
static inline u16 inw(u16 port) { return (u16)pio(PIO_INW, port, 0); }
static inline u32 inl(u16 port) { return pio(PIO_INL, port, 0); }

static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void) { __asm__ volatile("pause"); }

/* string.h subset (gcc may emit calls to these even when freestanding) */
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* console: 16550A on COM1, polled */
void uart_init(void);
void putc(char c);
void puts(const char *s);
int printf(const char *fmt, ...);
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
int snprintf(char *buf, size_t n, const char *fmt, ...);

/* boot arguments: "key=value" words of the kernel command line */
const char *cmdline(void);
u64 arg_u64(const char *key, u64 dflt);

/* IDT: a CPL3 handler for a device vector (trap gate, so iretq keeps IF set) */
void idt_set_user_handler(u8 vector, void (*handler)(void));

/* results: exit(0) stops the VM cleanly (i8042 reset); others use the test-exit
 * port, which makes pyvmm and QEMU exit with (code << 1) | 1. */
__attribute__((noreturn)) void exit(u32 code);
__attribute__((noreturn)) void fail(const char *fmt, ...);

int main(void);

#endif

/* First CPL3 instructions: align the stack as the SysV ABI wants, enter C. */
    .text
    .code64
    .globl rt_user_entry
rt_user_entry:
    and $~0xf, %rsp
    call rt_main
1:  jmp 1b
    .section .note.GNU-stack, "", @progbits

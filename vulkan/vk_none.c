/* vk_none.c: kla_vulkan_devices() when the Vulkan backend is not built. */
#include "kla.h"

int kla_vulkan_devices(char *buf, size_t len)
{
    if (buf && len) buf[0] = 0;
    return KLA_ENOSYS;
}

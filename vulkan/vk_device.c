/*
 * vk_device.c: the Vulkan backend's instance and device choice, its buffers, and the
 * memory behind KlaState and KlaBuffer (its own buffers, or the application's).
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vk_internal.h"

/* ---- validation messages (tests assert there are none) ------------------------------- */

static int g_messages;

/* Validation-layer warnings and errors seen by this process (KLA_VULKAN_VALIDATION=1). */
int kla__vulkan_messages(void);
int kla__vulkan_messages(void) { return g_messages; }

static VKAPI_ATTR VkBool32 VKAPI_CALL on_message(VkDebugUtilsMessageSeverityFlagBitsEXT sev,
                                                 VkDebugUtilsMessageTypeFlagsEXT type,
                                                 const VkDebugUtilsMessengerCallbackDataEXT *d,
                                                 void *user)
{
    (void)type, (void)user;
    g_messages++;
    fprintf(stderr, "kla vulkan %s: %s\n",
            sev & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT ? "error" : "warning",
            d && d->pMessage ? d->pMessage : "?");
    return VK_FALSE;
}

int has_ext(const VkExtensionProperties *e, uint32_t n, const char *name)
{
    for (uint32_t i = 0; i < n; i++)
        if (!strcmp(e[i].extensionName, name)) return 1;
    return 0;
}

int env_on(const char *name)
{
    const char *s = getenv(name);
    return s && *s && strcmp(s, "0") != 0;
}

/* An instance, with portability enumeration when the loader has it and, when asked for
 * and installed, the validation layer and a messenger counting its messages. */
VkResult make_instance(VkInstance *inst, VkDebugUtilsMessengerEXT *messenger, int validate)
{
    *inst = VK_NULL_HANDLE;
    if (messenger) *messenger = VK_NULL_HANDLE;
    uint32_t ne = 0;
    VkExtensionProperties *ext = NULL;
    if (vkEnumerateInstanceExtensionProperties(NULL, &ne, NULL) == VK_SUCCESS && ne) {
        ext = calloc(ne, sizeof *ext);
        if (!ext || vkEnumerateInstanceExtensionProperties(NULL, &ne, ext) != VK_SUCCESS) ne = 0;
    }
    const char *exts[4];
    uint32_t nx = 0;
    VkInstanceCreateFlags flags = 0;
#ifdef VK_KHR_portability_enumeration
    if (has_ext(ext, ne, VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME)) {
        exts[nx++] = VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME;
        flags |= VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR;
    }
#endif
    const char *layers[1];
    uint32_t nl = 0;
    if (validate && has_ext(ext, ne, VK_EXT_DEBUG_UTILS_EXTENSION_NAME)) {
        uint32_t nlp = 0;
        VkLayerProperties *lp = NULL;
        if (vkEnumerateInstanceLayerProperties(&nlp, NULL) == VK_SUCCESS && nlp &&
            (lp = calloc(nlp, sizeof *lp)) && vkEnumerateInstanceLayerProperties(&nlp, lp) == VK_SUCCESS)
            for (uint32_t i = 0; i < nlp; i++)
                if (!strcmp(lp[i].layerName, "VK_LAYER_KHRONOS_validation")) {
                    layers[nl++] = "VK_LAYER_KHRONOS_validation";
                    exts[nx++] = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
                    break;
                }
        free(lp);
        if (!nl) fprintf(stderr, "kla vulkan: KLA_VULKAN_VALIDATION set but the validation layer is not installed\n");
    }
    free(ext);
    VkApplicationInfo app = { .sType = VK_STRUCTURE_TYPE_APPLICATION_INFO, .pApplicationName = "kla",
                              .pEngineName = "kla", .apiVersion = VK_API_VERSION_1_1 };
    VkDebugUtilsMessengerCreateInfoEXT mi = {
        .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
        .messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT |
                           VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
        .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT |
                       VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                       VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
        .pfnUserCallback = on_message,
    };
    VkInstanceCreateInfo ci = { .sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
                                .pNext = nl ? &mi : NULL, .flags = flags,
                                .pApplicationInfo = &app, .enabledLayerCount = nl,
                                .ppEnabledLayerNames = layers, .enabledExtensionCount = nx,
                                .ppEnabledExtensionNames = exts };
    VkResult r = vkCreateInstance(&ci, NULL, inst);
    if (r != VK_SUCCESS) {
        *inst = VK_NULL_HANDLE;
        return r;
    }
    if (nl && messenger) {
        PFN_vkCreateDebugUtilsMessengerEXT f =
            (PFN_vkCreateDebugUtilsMessengerEXT)vkGetInstanceProcAddr(*inst, "vkCreateDebugUtilsMessengerEXT");
        if (f) f(*inst, &mi, NULL, messenger);
    }
    return VK_SUCCESS;
}

void destroy_instance(VkInstance inst, VkDebugUtilsMessengerEXT messenger)
{
    if (!inst) return;
    if (messenger) {
        PFN_vkDestroyDebugUtilsMessengerEXT f =
            (PFN_vkDestroyDebugUtilsMessengerEXT)vkGetInstanceProcAddr(inst, "vkDestroyDebugUtilsMessengerEXT");
        if (f) f(inst, messenger, NULL);
    }
    vkDestroyInstance(inst, NULL);
}

/* Physical devices with a compute queue; *out is malloc'ed. */
int list_devices(VkInstance inst, VkPhysicalDevice **out)
{
    *out = NULL;
    uint32_t n = 0;
    if (vkEnumeratePhysicalDevices(inst, &n, NULL) != VK_SUCCESS || !n) return 0;
    VkPhysicalDevice *pd = calloc(n, sizeof *pd);
    if (!pd) return 0;
    if (vkEnumeratePhysicalDevices(inst, &n, pd) < 0) {
        free(pd);
        return 0;
    }
    *out = pd;
    return (int)n;
}

int compute_family(VkPhysicalDevice pd, uint32_t *fam)
{
    uint32_t n = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, NULL);
    VkQueueFamilyProperties qp[32];
    if (n > 32) n = 32;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, qp);
    /* a compute-only family first (no graphics work shares it), else any with compute */
    for (int pass = 0; pass < 2; pass++)
        for (uint32_t i = 0; i < n; i++)
            if ((qp[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && qp[i].queueCount &&
                (pass || !(qp[i].queueFlags & VK_QUEUE_GRAPHICS_BIT))) {
                *fam = i;
                return 1;
            }
    return 0;
}

const char *type_name(VkPhysicalDeviceType t)
{
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete";
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated";
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual";
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return "cpu";
    default: return "other";
    }
}

static int type_rank(VkPhysicalDeviceType t)
{
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 4;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 3;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return 1;
    default: return 0;
    }
}

static int contains_ci(const char *hay, const char *needle)
{
    for (; *hay; hay++) {
        size_t i = 0;
        while (needle[i] && hay[i] && tolower((unsigned char)hay[i]) == tolower((unsigned char)needle[i])) i++;
        if (!needle[i]) return 1;
    }
    return 0;
}

/* The device index: KlaParams.gpu_device, else env KLA_VULKAN_DEVICE (an index or a name
 * substring), else discrete > integrated > virtual > cpu. -1 if none fits. */
int choose_device(VkPhysicalDevice *pd, int n, int want, char *err, size_t errlen)
{
    const char *env = getenv("KLA_VULKAN_DEVICE");
    if (want < 0 && env && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (!*end) want = (int)v;
        else {
            for (int i = 0; i < n; i++) {
                VkPhysicalDeviceProperties pr;
                vkGetPhysicalDeviceProperties(pd[i], &pr);
                uint32_t f;
                if (contains_ci(pr.deviceName, env) && compute_family(pd[i], &f)) return i;
            }
            snprintf(err, errlen, "KLA_VULKAN_DEVICE=%s matches no device", env);
            return -1;
        }
    }
    uint32_t fam;
    if (want >= 0) {
        if (want >= n || !compute_family(pd[want], &fam)) {
            snprintf(err, errlen, "Vulkan device %d does not exist or has no compute queue", want);
            return -1;
        }
        return want;
    }
    int best = -1, rank = -1;
    for (int i = 0; i < n; i++) {
        VkPhysicalDeviceProperties pr;
        vkGetPhysicalDeviceProperties(pd[i], &pr);
        if (pr.apiVersion < VK_API_VERSION_1_1 || !compute_family(pd[i], &fam)) continue;
        if (type_rank(pr.deviceType) > rank) best = i, rank = type_rank(pr.deviceType);
    }
    if (best < 0) snprintf(err, errlen, "no Vulkan 1.1 device with a compute queue");
    return best;
}

static int g_usable = -1;

int vk_usable(void)
{
    if (g_usable >= 0) return g_usable;
    VkInstance inst;
    g_usable = 0;
    if (make_instance(&inst, NULL, 0) != VK_SUCCESS) return 0;
    VkPhysicalDevice *pd;
    int n = list_devices(inst, &pd);
    char err[128];
    g_usable = n > 0 && choose_device(pd, n, -1, err, sizeof err) >= 0;
    free(pd);
    destroy_instance(inst, VK_NULL_HANDLE);
    return g_usable;
}

int kla_vulkan_devices(char *buf, size_t len)
{
    if (buf && len) buf[0] = 0;
    VkInstance inst;
    if (make_instance(&inst, NULL, 0) != VK_SUCCESS) return KLA_ENODEV;
    VkPhysicalDevice *pd;
    int n = list_devices(inst, &pd);
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        VkPhysicalDeviceProperties pr;
        vkGetPhysicalDeviceProperties(pd[i], &pr);
        if (buf && used < len) {
            int w = snprintf(buf + used, len - used, "%d: %s (%s)\n", i, pr.deviceName, type_name(pr.deviceType));
            if (w > 0) used += (size_t)w < len - used ? (size_t)w : len - used - 1;
        }
    }
    free(pd);
    destroy_instance(inst, VK_NULL_HANDLE);
    return n > 0 ? n : KLA_ENODEV;
}

/* ---- buffers --------------------------------------------------------------------------- */

static int find_type(const vkctx *c, uint32_t bits, VkMemoryPropertyFlags want)
{
    for (uint32_t i = 0; i < c->mem.memoryTypeCount; i++)
        if ((bits & (1u << i)) && (c->mem.memoryTypes[i].propertyFlags & want) == want) return (int)i;
    return -1;
}

void buf_free(vkctx *c, vbuf *b)
{
    if (b->map) vkUnmapMemory(c->dev, b->mem);
    if (b->buf) vkDestroyBuffer(c->dev, b->buf, NULL);
    if (b->mem) vkFreeMemory(c->dev, b->mem, NULL);
    memset(b, 0, sizeof *b);
}

/* b holds at least `bytes`; host-visible (mapped) when host, else device-local. */
int buf_ensure(vkctx *c, vbuf *b, VkDeviceSize bytes, int host)
{
    if (bytes < 256) bytes = 256;
    if (b->buf && b->cap >= bytes) return 0;
    buf_free(c, b);
    bytes = (bytes + 4095) & ~(VkDeviceSize)4095;
    VkBufferCreateInfo bi = { .sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = bytes,
                              .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE };
    VkResult r = vkCreateBuffer(c->dev, &bi, NULL, &b->buf);
    if (r != VK_SUCCESS) {
        b->buf = VK_NULL_HANDLE;
        return kla__fail(kla__current, KLA_ENOMEM, "backend vulkan: vkCreateBuffer of %llu bytes failed (%d)",
                         (unsigned long long)bytes, (int)r);
    }
    VkMemoryRequirements mr;
    vkGetBufferMemoryRequirements(c->dev, b->buf, &mr);
    int type = -1;
    if (host) {
        type = find_type(c, mr.memoryTypeBits, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                                                  VK_MEMORY_PROPERTY_HOST_COHERENT_BIT |
                                                  VK_MEMORY_PROPERTY_HOST_CACHED_BIT);
        if (type < 0)
            type = find_type(c, mr.memoryTypeBits, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                                                      VK_MEMORY_PROPERTY_HOST_COHERENT_BIT);
    } else {
        type = find_type(c, mr.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    }
    VkMemoryAllocateInfo ai = { .sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                .allocationSize = mr.size, .memoryTypeIndex = (uint32_t)type };
    VkResult ar = type < 0 ? VK_ERROR_FEATURE_NOT_PRESENT : vkAllocateMemory(c->dev, &ai, NULL, &b->mem);
    if (ar != VK_SUCCESS) {
        b->mem = VK_NULL_HANDLE;
        buf_free(c, b);
        return kla__fail(kla__current, KLA_ENOMEM, "backend vulkan: cannot allocate %llu bytes of %s memory (%s)",
                         (unsigned long long)mr.size, host ? "host-visible" : "device-local",
                         type < 0 ? "no such memory type" : ar == VK_ERROR_OUT_OF_DEVICE_MEMORY ? "out of device memory"
                         : ar == VK_ERROR_OUT_OF_HOST_MEMORY ? "out of host memory" : "vkAllocateMemory failed");
    }
    if (vkBindBufferMemory(c->dev, b->buf, b->mem, 0) != VK_SUCCESS ||
        (host && vkMapMemory(c->dev, b->mem, 0, VK_WHOLE_SIZE, 0, &b->map) != VK_SUCCESS)) {
        b->map = NULL;
        buf_free(c, b);
        return KLA_EIO;
    }
    b->cap = bytes;
    return 0;
}

/* ---- memory for KlaState and KlaBuffer ------------------------------------------------ */

/* Runs the command buffer (recorded by the caller between begin and end) and waits. */
int submit_wait(vkctx *c)
{
    VkSubmitInfo si = { .sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &c->cb };
    if (vkEndCommandBuffer(c->cb) != VK_SUCCESS || vkResetFences(c->dev, 1, &c->fence) != VK_SUCCESS ||
        vkQueueSubmit(c->queue, 1, &si, c->fence) != VK_SUCCESS ||
        vkWaitForFences(c->dev, 1, &c->fence, VK_TRUE, UINT64_MAX) != VK_SUCCESS)
        return KLA_EIO;
    return 0;
}

/* Begins the command buffer with a full memory barrier: whatever earlier submissions to
 * the queue wrote (ours, or the application's on a shared queue) is visible to it. */
int begin_cb(vkctx *c)
{
    VkCommandBufferBeginInfo cbi = { .sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                     .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT };
    if (vkResetCommandBuffer(c->cb, 0) != VK_SUCCESS || vkBeginCommandBuffer(c->cb, &cbi) != VK_SUCCESS)
        return KLA_EIO;
    barrier(c->cb, VK_PIPELINE_STAGE_ALL_COMMANDS_BIT, VK_ACCESS_MEMORY_WRITE_BIT, VK_PIPELINE_STAGE_ALL_COMMANDS_BIT,
            VK_ACCESS_MEMORY_READ_BIT | VK_ACCESS_MEMORY_WRITE_BIT);
    return 0;
}

/* host -> buffer (to_dev) or buffer -> host, through the staging buffer unless mapped */
int vk_mem_copy(void *state, void *h, void *host, int64_t bytes, int to_dev)
{
    vkctx *c = state;
    vbuf *b = h;
    if (b->map) {
        if (to_dev) memcpy(b->map, host, (size_t)bytes);
        else memcpy(host, b->map, (size_t)bytes);
        return 0;
    }
    int r = buf_ensure(c, &c->staging, (VkDeviceSize)bytes, 1);
    if (r) return r;
    if (to_dev) memcpy(c->staging.map, host, (size_t)bytes);
    if ((r = begin_cb(c))) return r;
    VkBufferCopy bc = { to_dev ? 0 : b->off, to_dev ? b->off : 0, (VkDeviceSize)bytes };
    vkCmdCopyBuffer(c->cb, to_dev ? c->staging.buf : b->buf, to_dev ? b->buf : c->staging.buf, 1, &bc);
    barrier(c->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
            to_dev ? VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT : VK_PIPELINE_STAGE_HOST_BIT,
            to_dev ? VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT : VK_ACCESS_HOST_READ_BIT);
    if ((r = submit_wait(c))) return r;
    if (!to_dev) memcpy(host, c->staging.map, (size_t)bytes);
    return 0;
}

/* Every call waits for its work, so nothing of ours is in flight: a buffer of our own is
 * destroyed at once; the application's is only forgotten. */
void vk_mem_free(void *state, void *h)
{
    vkctx *c = state;
    vbuf *b = h;
    if (!b) return;
    if (!b->wrapped) buf_free(c, b);
    free(b);
}

/* A zeroed buffer of `bytes`: device-local (host-visible where there is no staging) */
int vk_mem_new(void *state, int64_t bytes, void **h)
{
    vkctx *c = state;
    *h = NULL;
    if ((VkDeviceSize)bytes > c->props.limits.maxStorageBufferRange)
        return kla__fail(kla__current, KLA_ENOMEM, "backend vulkan: %lld bytes, over the device's "
                         "maxStorageBufferRange of %u bytes", (long long)bytes, c->props.limits.maxStorageBufferRange);
    vbuf *b = calloc(1, sizeof *b);
    if (!b) return KLA_ENOMEM;
    int r = buf_ensure(c, b, (VkDeviceSize)bytes, c->direct);
    if (!r && b->map) memset(b->map, 0, (size_t)bytes);
    if (!r && !b->map && !(r = begin_cb(c))) {
        vkCmdFillBuffer(c->cb, b->buf, 0, VK_WHOLE_SIZE, 0);
        barrier(c->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
                VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
        r = submit_wait(c);
    }
    if (r) {
        buf_free(c, b);
        free(b);
        return r;
    }
    *h = b;
    return 0;
}

/* The application's VkBuffer from offset: used in place, never freed. Its size is the
 * application's promise (Vulkan has no query for it); the offset alignment is checked. */
int vk_mem_wrap(void *state, uint64_t buffer, uint64_t offset, int64_t bytes, void **h)
{
    vkctx *c = state;
    *h = NULL;
    const VkDeviceSize align = c->props.limits.minStorageBufferOffsetAlignment;
    if (align && offset % align)
        return kla__fail(kla__current, KLA_EINVAL, "KlaBuffer: offset %llu is not a multiple of the device's "
                         "minStorageBufferOffsetAlignment (%llu)", (unsigned long long)offset, (unsigned long long)align);
    if ((VkDeviceSize)bytes > c->props.limits.maxStorageBufferRange)
        return kla__fail(kla__current, KLA_ENOMEM, "KlaBuffer: %lld bytes, over the device's maxStorageBufferRange "
                         "of %u bytes", (long long)bytes, c->props.limits.maxStorageBufferRange);
    vbuf *b = calloc(1, sizeof *b);
    if (!b) return KLA_ENOMEM;
    _Static_assert(sizeof(VkBuffer) == sizeof(uint64_t), "VkBuffer is a 64-bit handle");
    memcpy(&b->buf, &buffer, sizeof b->buf);
    b->off = offset, b->cap = (VkDeviceSize)bytes, b->wrapped = 1;
    *h = b;
    return 0;
}

void vk_mem_handle(void *h, uint64_t *buffer, uint64_t *offset)
{
    const vbuf *b = h;
    memcpy(buffer, &b->buf, sizeof *buffer);
    *offset = b->off;
}

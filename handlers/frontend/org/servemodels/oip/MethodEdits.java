package org.servemodels.oip;

import java.io.ByteArrayOutputStream;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;

/**
 * Method edits of a TorchServe class, for fixes too small to justify substituting the whole class (FrontendPatches
 * substitutes six whole classes; a class as large as GRPCJob gets edits of a few methods instead). The agent applies
 * edits only to the class bytes whose sha256 it pinned, so each method's code is known exactly: every edit checks
 * that code byte for byte and refuses (IllegalStateException) anything else.
 *
 * <p>The edits today, both of GRPCJob:
 * <ul>
 *   <li>isOpen() returns its stream observer's isCancelled(), the opposite of what its name says, so TorchServe
 *       0.12's ContinuousBatching takes every open gRPC stream for a closed one and drops it after its first chunk.
 *       `negateReturn` appends `iconst_1; ixor` before the `ireturn`: isOpen() returns !isCancelled().
 *   <li>its two inference constructors (Predictions, StreamPredictions and OIP ModelInfer calls) end with a call of
 *       GrpcAdmission.adopt(RequestInput) (`callBeforeReturn`): the job's request takes what the frontend knows of
 *       its gRPC call (request ID, arrival, deadline, trace), which TorchServe's gRPC services do not pass on.
 * </ul>
 */
public final class MethodEdits {
    private static final byte ICONST_1 = 0x04;
    private static final byte IXOR = (byte) 0x82;
    private static final byte IRETURN = (byte) 0xac;
    private static final byte RETURN = (byte) 0xb1;
    private static final int ALOAD = 0x19;
    private static final int INVOKESTATIC = 0xb8;

    private MethodEdits() {}

    /**
     * The class with the boolean method `name` (descriptor ()Z, straight-line code ending in ireturn, no exception
     * table, no stack map) returning the negation of what it returned: two bytes more code, one more stack slot.
     */
    public static byte[] negateReturn(byte[] original, String name, byte[] expectedCode) {
        ByteBuffer in = ByteBuffer.wrap(original);
        String[] utf8 = constants(in);
        Map<Integer, String> codes = codes(in, utf8, name, Set.of("()Z"));
        if (codes.isEmpty()) {
            throw new IllegalStateException("no method " + name + "()Z to edit");
        }
        return withNegatedCode(original, codes.keySet().iterator().next(), expectedCode);
    }

    /**
     * The Code attributes of the methods named `name` whose descriptor is one of `descriptors`: each attribute's
     * offset in the class, in order, with its method's descriptor. `in` is just after the constant pool.
     */
    private static Map<Integer, String> codes(ByteBuffer in, String[] utf8, String name, Set<String> descriptors) {
        skipToMethods(in);
        Map<Integer, String> codes = new TreeMap<>();
        int methods = in.getShort() & 0xffff;
        for (int m = 0; m < methods; m++) {
            in.getShort();
            String methodName = utf8[in.getShort() & 0xffff];
            String descriptor = utf8[in.getShort() & 0xffff];
            int attributes = in.getShort() & 0xffff;
            for (int a = 0; a < attributes; a++) {
                int attributeStart = in.position();
                String attribute = utf8[in.getShort() & 0xffff];
                int length = in.getInt();
                if (name.equals(methodName) && descriptors.contains(descriptor) && "Code".equals(attribute)) {
                    codes.put(attributeStart, descriptor);
                }
                in.position(in.position() + length);
            }
        }
        return codes;
    }

    /** One method to edit with `callBeforeReturn`: its exact code, and the local slot of the argument to pass on. */
    public record Call(byte[] expectedCode, int slot) {}

    /**
     * The class with a call of the static method `owner.name` (`descriptor`: one reference argument, void) added to
     * each method named `method` whose descriptor `edits` lists, just before its final `return`: `aload slot;
     * invokestatic`, five bytes more code. Each such method must be straight-line (no exception table, no stack map
     * frames) and its code the one expected byte for byte; the constant pool gains the method reference.
     */
    public static byte[] callBeforeReturn(byte[] original, String method, Map<String, Call> edits, String owner,
            String name, String descriptor) {
        ByteBuffer in = ByteBuffer.wrap(original);
        String[] utf8 = constants(in);
        int poolEnd = in.position();
        int next = utf8.length; // the first new constant's index
        Map<Integer, String> codes = codes(in, utf8, method, edits.keySet());
        if (codes.size() != edits.size()) {
            throw new IllegalStateException("found " + codes.size() + " of the " + edits.size() + " " + method
                    + " methods to edit");
        }
        ByteArrayOutputStream out = new ByteArrayOutputStream(original.length + 64);
        out.write(original, 0, 8);
        putShort(out, next + 6);
        out.write(original, 10, poolEnd - 10);
        for (String text : new String[] {owner, name, descriptor}) { // next, next + 1, next + 2
            byte[] bytes = text.getBytes(StandardCharsets.UTF_8);
            out.write(1);
            putShort(out, bytes.length);
            out.write(bytes, 0, bytes.length);
        }
        out.write(7); // next + 3: the owner class
        putShort(out, next);
        out.write(12); // next + 4: name and type
        putShort(out, next + 1);
        putShort(out, next + 2);
        out.write(10); // next + 5: the method reference
        putShort(out, next + 3);
        putShort(out, next + 4);
        int copied = poolEnd;
        for (Map.Entry<Integer, String> found : codes.entrySet()) {
            int start = found.getKey();
            Call call = edits.get(found.getValue());
            ByteBuffer code = ByteBuffer.wrap(original);
            code.position(start + 2);
            int length = code.getInt();
            int maxStack = code.getShort() & 0xffff;
            int maxLocals = code.getShort() & 0xffff;
            byte[] bytes = new byte[code.getInt()];
            code.get(bytes);
            if (!Arrays.equals(bytes, call.expectedCode()) || bytes[bytes.length - 1] != RETURN
                    || code.getShort() != 0 || hasStackMap(code, utf8)) {
                throw new IllegalStateException("the code of a " + method + " is not the one this edit was written for");
            }
            out.write(original, copied, start + 2 - copied);
            putInt(out, length + 5);
            putShort(out, Math.max(maxStack, 1));
            putShort(out, maxLocals);
            putInt(out, bytes.length + 5);
            out.write(bytes, 0, bytes.length - 1);
            out.write(ALOAD);
            out.write(call.slot());
            out.write(INVOKESTATIC);
            putShort(out, next + 5);
            out.write(RETURN);
            copied = start + 2 + 4 + 2 + 2 + 4 + bytes.length;
            copied = withLocalsToTheEnd(original, copied, start + 6 + length, bytes.length, utf8, out);
        }
        out.write(original, copied, original.length - copied);
        return out.toByteArray();
    }

    /**
     * Copies a Code attribute's tail (`from`: its exception table, then its attributes; `end`: the attribute's end)
     * whose code grew by five bytes at its end: a local variable that reached the old end (`codeLength`) reaches
     * the new one, as the class file format requires. Returns `end`.
     */
    private static int withLocalsToTheEnd(byte[] original, int from, int end, int codeLength, String[] utf8,
            ByteArrayOutputStream out) {
        ByteBuffer in = ByteBuffer.wrap(original, 0, end);
        in.position(from + 2); // the exception table: empty
        int attributes = in.getShort() & 0xffff;
        out.write(original, from, 4);
        for (int a = 0; a < attributes; a++) {
            int start = in.position();
            String name = utf8[in.getShort() & 0xffff];
            int length = in.getInt();
            if ("LocalVariableTable".equals(name) || "LocalVariableTypeTable".equals(name)) {
                out.write(original, start, 8); // name, length, entry count
                int entries = in.getShort() & 0xffff;
                for (int e = 0; e < entries; e++) {
                    int startPc = in.getShort() & 0xffff;
                    int span = in.getShort() & 0xffff;
                    putShort(out, startPc);
                    putShort(out, startPc + span == codeLength ? span + 5 : span);
                    out.write(original, in.position(), 6); // name, descriptor or signature, slot
                    in.position(in.position() + 6);
                }
            } else {
                out.write(original, start, 6 + length);
                in.position(start + 6 + length);
            }
        }
        return end;
    }

    /** Whether the Code attribute's own attributes, `in` at their count, hold stack map frames. */
    private static boolean hasStackMap(ByteBuffer in, String[] utf8) {
        int attributes = in.getShort() & 0xffff;
        for (int a = 0; a < attributes; a++) {
            if ("StackMapTable".equals(utf8[in.getShort() & 0xffff])) {
                return true;
            }
            int length = in.getInt();
            in.position(in.position() + length);
        }
        return false;
    }

    /** The constant pool's UTF-8 entries by index (others null), `in` left just after the pool. */
    private static String[] constants(ByteBuffer in) {
        in.position(8);
        String[] utf8 = new String[in.getShort() & 0xffff];
        for (int i = 1; i < utf8.length; i++) {
            int tag = in.get() & 0xff;
            switch (tag) {
                case 1:
                    byte[] text = new byte[in.getShort() & 0xffff];
                    in.get(text);
                    utf8[i] = new String(text, StandardCharsets.UTF_8);
                    break;
                case 5:
                case 6:
                    in.position(in.position() + 8);
                    i++; // a long or a double takes two entries
                    break;
                case 3:
                case 4:
                case 9:
                case 10:
                case 11:
                case 12:
                case 17:
                case 18:
                    in.position(in.position() + 4);
                    break;
                case 15:
                    in.position(in.position() + 3);
                    break;
                case 7:
                case 8:
                case 16:
                case 19:
                case 20:
                    in.position(in.position() + 2);
                    break;
                default:
                    throw new IllegalStateException("unknown constant pool tag " + tag);
            }
        }
        return utf8;
    }

    /** From just after the constant pool to the method count: access flags, names, interfaces and fields. */
    private static void skipToMethods(ByteBuffer in) {
        in.position(in.position() + 6); // access flags, this class, super class
        int interfaces = in.getShort() & 0xffff;
        in.position(in.position() + 2 * interfaces);
        skipMembers(in); // fields
    }

    private static void putShort(ByteArrayOutputStream out, int value) {
        out.write(value >>> 8);
        out.write(value);
    }

    private static void putInt(ByteArrayOutputStream out, int value) {
        putShort(out, value >>> 16);
        putShort(out, value);
    }

    private static void skipMembers(ByteBuffer in) {
        int count = in.getShort() & 0xffff;
        for (int i = 0; i < count; i++) {
            in.position(in.position() + 6);
            int attributes = in.getShort() & 0xffff;
            for (int a = 0; a < attributes; a++) {
                in.getShort();
                int length = in.getInt();
                in.position(in.position() + length);
            }
        }
    }

    private static byte[] withNegatedCode(byte[] original, int attributeStart, byte[] expectedCode) {
        ByteBuffer in = ByteBuffer.wrap(original);
        in.position(attributeStart + 2);
        int length = in.getInt();
        int maxStack = in.getShort() & 0xffff;
        int maxLocals = in.getShort() & 0xffff;
        int codeLength = in.getInt();
        byte[] code = new byte[codeLength];
        in.get(code);
        if (!Arrays.equals(code, expectedCode) || code[codeLength - 1] != IRETURN || in.getShort() != 0) {
            throw new IllegalStateException("the method's code is not the one this edit was written for");
        }
        ByteBuffer out = ByteBuffer.allocate(original.length + 2);
        out.put(original, 0, attributeStart + 2);
        out.putInt(length + 2);
        out.putShort((short) Math.max(maxStack, 2));
        out.putShort((short) maxLocals);
        out.putInt(codeLength + 2);
        out.put(code, 0, codeLength - 1);
        out.put(ICONST_1).put(IXOR).put(IRETURN);
        int rest = attributeStart + 2 + 4 + 2 + 2 + 4 + codeLength;
        out.put(original, rest, original.length - rest);
        return out.array();
    }

    /** Bytes from hex, for the expected code of an edit. */
    static byte[] hex(String digits) {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        for (int i = 0; i < digits.length(); i += 2) {
            bytes.write(Integer.parseInt(digits.substring(i, i + 2), 16));
        }
        return bytes.toByteArray();
    }
}

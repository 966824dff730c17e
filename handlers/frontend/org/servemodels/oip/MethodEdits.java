package org.servemodels.oip;

import java.io.ByteArrayOutputStream;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;

/**
 * One-method edits of a TorchServe class, for a fix too small to justify substituting the whole class (FrontendPatches
 * substitutes six whole classes; a class as large as GRPCJob gets a one-method edit instead). The agent applies an
 * edit only to the class bytes whose sha256 it pinned, so the method's code is known exactly: `negateReturn`
 * checks that code byte for byte and refuses (IllegalStateException) anything else.
 *
 * <p>The one edit today: GRPCJob.isOpen() returns its stream observer's isCancelled(), the opposite of what its name
 * says, so TorchServe 0.12's ContinuousBatching takes every open gRPC stream for a closed one and drops it after
 * its first chunk. The edit appends `iconst_1; ixor` before the `ireturn`: isOpen() returns !isCancelled().
 */
public final class MethodEdits {
    private static final byte ICONST_1 = 0x04;
    private static final byte IXOR = (byte) 0x82;
    private static final byte IRETURN = (byte) 0xac;

    private MethodEdits() {}

    /**
     * The class with the boolean method `name` (descriptor ()Z, straight-line code ending in ireturn, no exception
     * table, no stack map) returning the negation of what it returned: two bytes more code, one more stack slot.
     */
    public static byte[] negateReturn(byte[] original, String name, byte[] expectedCode) {
        ByteBuffer in = ByteBuffer.wrap(original);
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
        in.position(in.position() + 6); // access flags, this class, super class
        int interfaces = in.getShort() & 0xffff;
        in.position(in.position() + 2 * interfaces);
        skipMembers(in); // fields
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
                if (name.equals(methodName) && "()Z".equals(descriptor) && "Code".equals(attribute)) {
                    return withNegatedCode(original, attributeStart, expectedCode);
                }
                in.position(in.position() + length);
            }
        }
        throw new IllegalStateException("no method " + name + "()Z to edit");
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
